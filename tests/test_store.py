"""The store: atomic commits, id-addressed rows, leftovers of killed writers, the lock."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from vqret.retrieval.atomic import atomic_write, replace_folder
from vqret.retrieval.embedder import ModelSpec
from vqret.retrieval.index import (
    build_index,
    index_files,
    load_index,
    save_index,
    search_index,
)
from vqret.retrieval.store import (
    IMAGES,
    Store,
    StoreError,
    StoreLockedError,
    embeddings_to_arrow,
    find_store,
    now_utc,
    row_schema,
)

DIM = 8


def make_rows(ids, dim=DIM, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(ids), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": [f"img{i}.png" for i in ids],
            "size": pa.array([100] * len(ids), pa.int64()),
            "mtime_ns": pa.array([1] * len(ids), pa.int64()),
            "hash": [f"h{i}" for i in ids],
            "width": pa.array([64] * len(ids), pa.int32()),
            "height": pa.array([64] * len(ids), pa.int32()),
            "embedding": embeddings_to_arrow(vectors),
            "added_at": pa.array([now_utc()] * len(ids), pa.timestamp("us", "UTC")),
        }
    )  # no codes columns: the store fills them with nulls


@pytest.fixture
def store(tmp_path) -> Store:
    spec = ModelSpec(model="m", pretrained="none", weights_id="none", embed_dim=DIM)
    (tmp_path / "photos").mkdir()
    return Store.create(tmp_path / "photos" / ".vqret", spec, tmp_path / "photos")


def test_commit_add_replace_remove(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1, 2, 3]))
        w.commit(make_rows([2], seed=5), remove_ids=[2, 3])  # replace 2, drop 3
    reader = Store(store.path)
    table = reader.read_table()
    assert sorted(table.column("id").to_pylist()) == [0, 1, 2]
    assert len(reader) == 3
    ids, vectors = reader.vectors()
    # the replaced row carries its new embedding, addressed by id, not position
    assert np.allclose(vectors[list(ids).index(2)], make_rows([2], seed=5)["embedding"][0].values)
    # images/ is a plain Parquet dataset: readable as-is, with no stale rows left behind
    assert pq.read_table(store.path / IMAGES).num_rows == 3
    assert table.column("codes").null_count == 3


def test_compact_merges_parts_and_keeps_rows(store):
    with store.writer() as w:
        for i in range(5):
            w.commit(make_rows([i], seed=i))
        assert len(store.parts()) == 5
        w.compact()
    assert len(store.parts()) == 1
    assert sorted(Store(store.path).read_table().column("id").to_pylist()) == [0, 1, 2, 3, 4]
    assert len(list((store.path / IMAGES).iterdir())) == 1


def _old_part(store, ids, seed=0) -> str:
    """A part as a schema 1 store wrote it: no metadata columns, and no codes either."""
    rows = make_rows(ids, seed=seed)
    name = f"part-old-{ids[0]}.parquet"
    pq.write_table(rows, store.path / IMAGES / name)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["tables"]["images"]["parts"].append(name)
    manifest["tables"]["images"]["rows"] += len(ids)
    manifest["tables"]["images"]["next_id"] = max(ids) + 1
    manifest["schema_version"] = 1
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    store.refresh()
    return name


def test_parts_older_than_a_column_read_it_as_nulls(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1]))
    _old_part(store, [5, 6], seed=1)
    assert Store(store.path).schema_version == 1  # still readable
    table = store.read_table()  # both kinds of parts, in the current schema
    assert table.schema == row_schema(DIM)
    assert table.num_rows == 4 and table.column("taken_source").null_count == 4
    assert store.read_table(["id", "folder"]).column("folder").null_count == 4
    with store.writer() as w:
        w.compact()  # merges the old part with the new: one schema
    assert len(store.parts()) == 1
    assert store.read_table().column("id").to_pylist() == [0, 1, 5, 6]


def test_set_part_columns_rewrites_one_part_and_leaves_vectors_alone(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1]))
    old = _old_part(store, [5, 6], seed=1)
    ids, before = store.vectors()
    changed_at = store.table_generation()
    with store.writer() as w:
        w.set_part_columns(old, {"folder": pa.array(["a", "b"]),
                                 "taken_source": pa.array(["mtime", "exif"])}, schema_version=2)
        with pytest.raises(ValueError, match="embedding"):
            w.set_part_columns(store.parts()[1], {"embedding": pa.array([1, 2])})
        with pytest.raises(ValueError, match="3 values"):
            w.set_part_columns(store.parts()[1], {"folder": pa.array(["a", "b", "c"])})
    assert old not in store.parts() and len(store.parts()) == 2  # in its place, not appended
    assert store.schema_version == 2
    assert store.table_generation() == changed_at  # the search index stays valid
    after_ids, after = store.vectors()
    assert after_ids.tolist() == ids.tolist() and after.tobytes() == before.tobytes()
    rows = store.read_table(["id", "folder", "taken_source"]).to_pylist()
    assert rows == [{"id": 0, "folder": None, "taken_source": None},
                    {"id": 1, "folder": None, "taken_source": None},
                    {"id": 5, "folder": "a", "taken_source": "mtime"},
                    {"id": 6, "folder": "b", "taken_source": "exif"}]


def test_killed_writer_leftovers_are_ignored_then_cleaned(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1]))
    # a writer killed after writing a part but before publishing the manifest
    pq.write_table(make_rows([7]), store.path / IMAGES / "part-999999-dead.parquet")
    (store.path / ".tmp-manifest.json-x").write_text("{half")
    assert sorted(Store(store.path).read_table().column("id").to_pylist()) == [0, 1]
    with store.writer():
        pass
    assert not (store.path / IMAGES / "part-999999-dead.parquet").exists()
    assert not list(store.path.glob(".tmp-*"))


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    atomic_write(target, "text")
    assert target.read_text() == "text"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"by path"))
    assert target.read_bytes() == b"by path"

    def half_then_killed(tmp: str) -> None:
        Path(tmp).write_bytes(b"{ha")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_killed)
    assert target.read_bytes() == b"by path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_replace_folder_swaps_a_whole_folder(tmp_path):
    final = tmp_path / "bundle"
    for version in ("one", "two"):
        new = tmp_path / f".tmp-bundle-{version}"
        new.mkdir()
        (new / "a.txt").write_text(version)
        replace_folder(new, final)
        assert (final / "a.txt").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_second_writer_is_refused_with_a_clear_message(store):
    with store.writer():
        with pytest.raises(StoreLockedError, match=r"another writer \(`.+`, pid \d+\) is .*--wait"):
            store.writer(wait=0)


def test_ids_are_never_reused(store):
    with store.writer() as w:
        first = w.allocate_ids(3)
        w.commit(make_rows(list(first)), remove_ids=[])
        w.commit(remove_ids=list(first))
    with store.writer() as w:
        assert w.allocate_ids(1)[0] == 3


def test_find_store_walks_up(store, tmp_path):
    deep = tmp_path / "photos" / "a" / "b"
    deep.mkdir(parents=True)
    assert find_store(deep) == store.path.resolve()
    assert find_store(tmp_path) is None


def test_other_schema_version_is_refused(store):
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="--rebuild"):
        Store(store.path)


# ---- the FAISS index ----------------------------------------------------------------------


def test_index_maps_to_row_ids_and_clips_k(store):
    with store.writer() as w:
        w.commit(make_rows([10, 20, 30]))
    ids, vectors = store.vectors()
    index = build_index(ids, vectors)
    scores, found = search_index(index, vectors[1:2], k=50)
    assert found.shape == (1, 3)  # k larger than the collection returns all of it
    assert found[0, 0] == ids[1] and found[0, 0] in (10, 20, 30)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scores[0]) <= 1e-6)


def test_stale_or_damaged_index_is_rebuilt_from_rows(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1]))
    save_index(store, build_index(*store.vectors()))
    assert load_index(store).ntotal == 2
    with store.writer() as w:
        w.commit(make_rows([2]))  # the saved index now lags the rows
    assert load_index(store).ntotal == 3
    save_index(store, build_index(*store.vectors()))
    index_files(store)[0].write_bytes(b"garbage")
    index = load_index(store)
    assert index.ntotal == 3
    assert set(search_index(index, store.vectors()[1][:1], 3)[1][0]) == {0, 1, 2}
