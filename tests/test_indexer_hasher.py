"""The Indexer's `hasher` option: new and changed files hashed elsewhere (the Ray engine's
workers), answers in any order, give the same plan as hashing on the driver."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixtures.shapes import make_shape_folder
from vqret.retrieval.content_hash import file_hash
from vqret.retrieval.indexer import index_folder
from vqret.retrieval.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def reversed_hasher(fail: str | None = None):
    """Answers last file first; `fail`: a file name answered as unreadable."""
    asked: list[list[str]] = []

    def hasher(names):
        asked.append(list(names))
        for i in reversed(range(len(names))):
            if fail and names[i].endswith(fail):
                yield i, None, "unreadable (simulated outage)"
            else:
                yield i, file_hash(names[i]), None

    hasher.asked = asked
    return hasher


def _rows(store: Store) -> list[tuple]:
    table = store.read_table(["id", "path", "hash", "size"]).sort_by("id")
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_hashes_answered_out_of_order_plan_like_the_driver(tmp_path, embedder):
    folder = tmp_path / "images"
    make_shape_folder(folder, 12, seed=5)
    local = Store.create(tmp_path / "a.vqret", embedder.spec, folder)
    other = Store.create(tmp_path / "b.vqret", embedder.spec, folder)
    hasher = reversed_hasher()

    def both() -> tuple[dict, dict]:
        a = index_folder(local, embedder, folder).to_dict()
        b = index_folder(other, embedder, folder, hasher=hasher).to_dict()
        return ({k: v for k, v in a.items() if k != "seconds"},
                {k: v for k, v in b.items() if k != "seconds"})

    a, b = both()
    assert a == b and a["added"] == 12
    assert sorted(hasher.asked[0]) == sorted(str(p) for p in folder.glob("*.png"))
    assert _rows(local) == _rows(other)

    files = sorted(folder.glob("*.png"))
    files[0].rename(folder / "renamed.png")
    shutil.copy(files[1], folder / "copy.png")
    files[2].unlink()
    a, b = both()
    assert a == b and (a["renamed"], a["added"], a["removed"], a["embedded"]) == (1, 1, 1, 0)
    assert sorted(Path(n).name for n in hasher.asked[-1]) == ["copy.png", "renamed.png"]
    assert _rows(local) == _rows(other)


def test_a_file_the_hasher_cannot_read_is_reported_and_the_rest_indexed(tmp_path, embedder):
    folder = tmp_path / "images"
    names = [row[0].name for row in make_shape_folder(folder, 6, seed=6)]
    store = Store.create(tmp_path / "s.vqret", embedder.spec, folder)
    report = index_folder(store, embedder, folder, hasher=reversed_hasher(fail=names[2]))
    assert [(f.path, f.error) for f in report.failed] == [
        (names[2], "unreadable (simulated outage)")
    ]
    assert sorted(Path(p).name for p in store.read_table(["path"]).column("path").to_pylist()) \
        == sorted(n for n in names if n != names[2])


def test_a_hasher_that_loses_an_answer_stops_the_run_before_any_change(tmp_path, embedder):
    folder = tmp_path / "images"
    make_shape_folder(folder, 5, seed=7)
    store = Store.create(tmp_path / "s.vqret", embedder.spec, folder)
    index_folder(store, embedder, folder)
    before = _rows(store)
    for p in sorted(folder.glob("*.png"))[:2]:
        p.rename(p.with_name("moved_" + p.name))

    def lossy(names):
        yield from list(reversed_hasher()(names))[1:]

    with pytest.raises(RuntimeError, match="answered 1 times for 2 files"):
        index_folder(store, embedder, folder, hasher=lossy)
    assert _rows(store) == before


class HashingWhileReading:
    """An embedder that hashes each file it embeds, as the Ray engine's actors do."""

    hashes_what_it_reads = True

    def __init__(self, embedder):
        self.embedder = embedder
        self.spec = embedder.spec

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def iter_image_files(self, paths, num_workers=None):
        for batch in self.embedder.iter_image_files(paths):
            batch.hashes = [file_hash(paths[i]) for i in batch.indices]
            yield batch


def test_a_first_run_takes_hashes_from_the_embedder_and_reads_each_file_once(tmp_path, embedder):
    folder = tmp_path / "images"
    make_shape_folder(folder, 8, seed=8)
    shutil.copy(sorted(folder.glob("*.png"))[3], folder / "same.png")  # the same content twice
    (folder / "broken.png").write_bytes(b"not a png")
    local = Store.create(tmp_path / "a.vqret", embedder.spec, folder)
    other = Store.create(tmp_path / "b.vqret", embedder.spec, folder)

    def no_hash_pass(names):
        raise AssertionError(f"a hash pass on a first run: {list(names)}")

    a = index_folder(local, embedder, folder)
    b = index_folder(other, HashingWhileReading(embedder), folder, hasher=no_hash_pass)
    assert _rows(local) == _rows(other)  # same ids, paths, sizes and content hashes
    assert (b.added, b.failed) == (a.added, a.failed) == (9, a.failed)
    assert [f.path for f in b.failed] == ["broken.png"]
    # the one cost: the same content twice in a first run is embedded twice, not copied
    assert (a.embedded, b.embedded) == (8, 9)

    # Later runs have rows to match: new and changed files go through the hasher again.
    hasher = reversed_hasher()
    (folder / "same.png").rename(folder / "moved.png")
    b = index_folder(other, HashingWhileReading(embedder), folder, hasher=hasher)
    assert b.renamed == 1 and b.embedded == 0
    # (a file that failed to decode isn't read again while it is unchanged)
    assert [Path(n).name for n in hasher.asked[0]] == ["moved.png"]
    assert [f.path for f in b.failed] == ["broken.png"] and b.failed_before == 1
