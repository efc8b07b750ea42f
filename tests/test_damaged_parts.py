"""A damaged part costs its rows, not the store: told by size and checksum, named by `vqret
info`, skipped by search (which says so), re-embedded under the same ids by `vqret index`.
The same for a damaged index file: searched from the rows meanwhile, rebuilt by the index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import make_shape_folder
from test_store import make_rows
from vqret.retrieval.collection import Collection
from vqret.retrieval.index import index_files
from vqret.retrieval.part_health import RECOVERY
from vqret.retrieval.store import IMAGES, Store, StoreError
from vqret.retrieval.store_writer import StoreWriter

pytestmark = pytest.mark.usefixtures("one_thread")

N = 16  # two parts of 8


@pytest.fixture(scope="module")
def template(tmp_path_factory, embedder) -> Path:
    """A folder of 16 drawings and its store in two parts of 8 rows: indexed twice, 8 new
    each time, without the compaction at the end of a run (which would merge them)."""
    folder = tmp_path_factory.mktemp("template") / "images"
    make_shape_folder(folder, N // 2, seed=99)
    compact = StoreWriter.compact
    StoreWriter.compact = lambda self, *a, **k: None
    try:
        col = Collection.create(folder, embedder=embedder)
        col.index()
        make_shape_folder(folder / "more", N // 2, seed=100)
        report = col.index()
    finally:
        StoreWriter.compact = compact
    assert report.added == N // 2 and len(col.store) == N and len(col.store.parts()) == 2
    return folder


@pytest.fixture
def folder(template, tmp_path) -> Path:
    """A copy of the template: each test damages its own."""
    copy = tmp_path / "images"
    shutil.copytree(template, copy)
    return copy


def ids_by_path(store_path: Path) -> dict[str, int]:
    rows = Store(store_path).read_table(["id", "path"]).to_pylist()
    return {r["path"]: r["id"] for r in rows}


def part_ids(store: Store, part: str) -> set[int]:
    return set(store.read_part(part, ["id"]).column("id").to_pylist())


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_truncated_part_is_named_skipped_and_repaired_as_a_user_sees_it(folder, embedder):
    store_path = folder / ".vqret"
    before = ids_by_path(store_path)
    store = Store(store_path)
    damaged, healthy = store.parts()
    lost, kept = part_ids(store, damaged), part_ids(store, healthy)
    part = store_path / IMAGES / damaged
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a disk that filled up

    info = run_cli("info", "--store", str(store_path))
    line = next(ln for ln in info.stdout.splitlines() if "damaged" in ln)
    assert f"images/{damaged}: truncated" in line and "8 rows unavailable" in line
    assert "vqret index" in line

    env = {"VQRET_TEXT_ENCODER": "torch"}  # no ONNX export in this test's searches
    proc = run_cli("search", "a red circle", "-k", str(N), "--store", str(store_path), "--json",
                   env=env)
    hits = json.loads(proc.stdout)
    assert {h["id"] for h in hits} == kept  # all the healthy rows, none of the damaged part
    note = [ln for ln in proc.stderr.splitlines() if "unavailable" in ln]
    assert len(note) == 1
    assert note[0].startswith(f"8 rows unavailable: part images/{damaged} truncated")
    assert note[0].endswith("run `vqret index` to repair")

    report = run_json("index", str(folder))
    assert report["repaired"] == 8 and report["added"] == 0 and report["removed"] == 0
    assert report["embedded"] == 0 and report["unchanged"] == N  # nothing else was touched
    assert ids_by_path(store_path) == before  # the repaired rows have their old ids back
    col = Collection.open(store_path, embedder)
    assert col.info()["damaged"] == []
    hits = col.search(text="a red circle", k=N)
    assert {h.id for h in hits} == lost | kept and hits.note is None


def test_flipped_byte_is_caught_by_the_checksum_and_repaired(folder, embedder):
    store_path = folder / ".vqret"
    before = ids_by_path(store_path)
    col = Collection.open(store_path, embedder)
    vectors_before = dict(zip(*col.store.vectors(), strict=True))
    damaged = col.store.parts()[1]
    lost = part_ids(col.store, damaged)
    part = store_path / IMAGES / damaged
    flip_byte(part, part.stat().st_size // 3)  # same size: only the checksum tells

    col = Collection.open(store_path, embedder)
    [named] = col.info()["damaged"]
    assert named["part"] == damaged and named["rows"] == 8
    assert named["cause"].startswith("checksum mismatch")
    hits = col.search(text="a blue square", k=N)
    assert len(hits) == N - 8 and not {h.id for h in hits} & lost
    assert hits.note.startswith(f"8 rows unavailable: part images/{damaged} checksum mismatch")
    filtered = col.search(text="a blue square", k=N, where="width > 0")  # same rows missing
    assert {h.id for h in filtered} == {h.id for h in hits}
    assert col.stored_vectors([h.id for h in hits]).shape == (N - 8, col.store.dim)

    report = col.index()
    assert report.repaired == 8 and report.embedded == 0 and report.added == 0
    assert ids_by_path(store_path) == before
    col = Collection.open(store_path, embedder)
    assert col.info()["damaged"] == []
    for i, vector in zip(*col.store.vectors(), strict=True):  # the same file, the same vector
        np.testing.assert_allclose(vector, vectors_before[i], atol=1e-5)
    hits = col.search(text="a blue square", k=N)
    assert len(hits) == N and hits.note is None


def test_the_server_answers_from_the_healthy_parts_with_the_note(folder, embedder):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    store_path = folder / ".vqret"
    damaged = Store(store_path).parts()[0]
    flip_byte(store_path / IMAGES / damaged, 100)
    app = create_app([Collection.open(store_path, embedder)], warm=False)
    try:
        with TestClient(app) as client:
            r = client.post("/api/search", json={"text": "a red circle", "k": N})
    finally:
        app.state.service.close()
    assert r.status_code == 200
    body = r.json()
    assert len(body["results"]) == N - 8
    assert body["note"].startswith(f"8 rows unavailable: part images/{damaged} checksum")


def test_damaged_index_file_is_searched_from_the_rows_and_rebuilt(folder, embedder):
    store_path = folder / ".vqret"
    col = Collection.open(store_path, embedder)
    expected = [(h.id, round(h.score, 4)) for h in col.search(text="a green star", k=5)]
    faiss_file = index_files(col.store)[0]
    flip_byte(faiss_file, faiss_file.stat().st_size - 40)  # in the last vectors: faiss reads it

    col = Collection.open(store_path, embedder)
    assert col.info()["index"]["damaged"].startswith("checksum mismatch")
    hits = col.search(text="a green star", k=5)  # an exact index from the rows meanwhile
    assert [(h.id, round(h.score, 4)) for h in hits] == expected

    faiss_file.write_bytes(faiss_file.read_bytes()[:100])  # truncated: told by its size
    col = Collection.open(store_path, embedder)
    assert col.info()["index"]["damaged"].startswith("truncated (100 of")
    assert [(h.id, round(h.score, 4)) for h in col.search(text="a green star", k=5)] == expected

    report = col.index()
    assert report.repaired == 0 and report.embedded == 0
    col = Collection.open(store_path, embedder)
    assert "damaged" not in col.info()["index"]
    assert faiss_file.stat().st_size > 100


def test_without_a_sound_recovery_copy_the_files_come_back_as_new_rows(folder, embedder):
    store_path = folder / ".vqret"
    store = Store(store_path)
    damaged, healthy = store.parts()
    lost, kept = part_ids(store, damaged), part_ids(store, healthy)
    (store_path / IMAGES / damaged).write_bytes(b"")
    flip_byte(store_path / RECOVERY / IMAGES / damaged, 20)  # its copy is damaged too

    report = Collection.open(store_path, embedder).index()
    assert report.repaired == 0 and report.added == 8 and report.embedded == 8
    after = Store(store_path)
    assert len(after) == N and after.damaged_parts() == []
    ids = set(after.read_table(["id"]).column("id").to_pylist())
    assert kept <= ids and not ids & lost  # new ids: the old ones were nowhere to be read


def test_damaged_text_part_is_skipped_then_repaired_under_its_ids(folder, embedder, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("text\na red circle\na blue square\na green star\n")
    store_path = folder / ".vqret"
    col = Collection.open(store_path, embedder)
    col.index_texts(captions)
    col.index_texts(tmp_path / "captions.csv")  # unchanged: no second part
    texts = col.store.read_table(["id", "text"], "texts").to_pylist()
    [part] = col.store.parts("texts")
    flip_byte(store_path / "texts" / part, 50)

    col = Collection.open(store_path, embedder)
    assert [d["part"] for d in col.info()["damaged"]] == [part]
    nothing = col.search(text="a red circle", texts=True)  # every text is in that part
    assert len(nothing) == 0 and nothing.note.startswith("3 rows unavailable: part texts/")
    hits = col.search(text="a red circle", k=3)  # the images are all there
    assert len(hits) == 3 and hits.note is None

    assert col.index().repaired == 3
    col = Collection.open(store_path, embedder)
    assert col.store.read_table(["id", "text"], "texts").to_pylist() == texts
    assert col.search(text="a red circle", texts=True, k=1)[0].text == "a red circle"


# ---- the layout, without a model ------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> Store:
    from vqret.retrieval.embedder import ModelSpec

    spec = ModelSpec(model="m", pretrained="none", weights_id="none", embed_dim=8)
    (tmp_path / "photos").mkdir()
    return Store.create(tmp_path / "photos" / ".vqret", spec, tmp_path / "photos")


def test_each_part_has_a_check_and_a_recovery_copy_while_it_is_listed(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1, 2]))
        w.commit(make_rows([3, 4]))
        w.commit(remove_ids=[1])  # rewrites the first part: its copy goes with it
    parts = store.parts()
    checks = store.manifest["tables"][IMAGES]["checks"]
    assert sorted(checks) == sorted(parts)
    assert sorted(c["rows"] for c in checks.values()) == [2, 2]
    for part in parts:
        assert checks[part]["bytes"] == (store.path / IMAGES / part).stat().st_size
    recovered = sorted(p.name for p in (store.path / RECOVERY / IMAGES).iterdir())
    assert recovered == sorted(parts)
    (store.path / RECOVERY / IMAGES / "part-999999-dead.parquet").write_bytes(b"left over")
    with store.writer():  # the next writer removes what a killed one left
        pass
    assert sorted(p.name for p in (store.path / RECOVERY / IMAGES).iterdir()) == sorted(parts)


def test_a_store_without_checks_opens_and_still_skips_an_unreadable_part(store):
    with store.writer() as w:
        w.commit(make_rows([0, 1]))
        w.commit(make_rows([2, 3, 4]))
    manifest = json.loads((store.path / "manifest.json").read_text())
    for entry in manifest["tables"].values():
        entry.pop("checks", None)  # as a vqret before checks wrote it
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    first, second = store.parts()
    old = Store(store.path)
    assert old.damaged_parts() == [] and len(old.read_table()) == 5  # size checks: none to do
    part = store.path / IMAGES / first
    part.write_bytes(part.read_bytes()[:30])
    old = Store(store.path)
    assert old.read_table(["id"]).column("id").to_pylist() == [2, 3, 4]
    [damaged] = old.damaged_parts()
    assert damaged.part == first and damaged.rows is None
    assert damaged.cause.startswith("unreadable Parquet")


def test_size_only_verification_and_writers_refusing_a_damaged_part(store, monkeypatch):
    with store.writer() as w:
        w.commit(make_rows([0, 1]))
        w.commit(make_rows([2, 3]))
    first = store.parts()[0]
    flip_byte(store.path / IMAGES / first, 40)
    monkeypatch.setenv("VQRET_VERIFY", "size")  # sizes only: a flipped byte goes unseen
    assert Store(store.path).damaged_parts() == []
    monkeypatch.setenv("VQRET_VERIFY", "full")
    [damaged] = Store(store.path).damaged_parts()
    assert damaged.part == first and damaged.rows == 2
    with Store(store.path).writer() as w, pytest.raises(StoreError, match="is damaged: run"):
        w.commit(remove_ids=[3])  # a writer must not copy a damaged part's rows onward


def test_a_damaged_part_of_video_moments_is_repaired_from_the_frames(tmp_path, embedder):
    """A video's moments in a damaged part are embedded again from their frames at `t`,
    under their old ids; the video's other parts and its segments are left as they were."""
    from fixtures.videos import make_shape_video

    folder = tmp_path / "videos"
    folder.mkdir()
    make_shape_video(folder / "clip.mp4")
    col = Collection.create(folder, embedder=embedder)
    col.index()
    store_path = folder / ".vqret"
    columns = ["id", "path", "video_id", "t", "segment_start", "segment_end"]
    before = sorted(Store(store_path).read_table(columns).to_pylist(), key=lambda r: r["id"])
    assert len(before) == 3 and all(r["video_id"] is not None for r in before)
    (part,) = Store(store_path).parts()
    flip_byte(store_path / IMAGES / part, (store_path / IMAGES / part).stat().st_size // 2)

    report = Collection.open(folder, embedder=embedder).index()
    assert report.repaired == 3 and report.added == 0
    after = sorted(Store(store_path).read_table(columns).to_pylist(), key=lambda r: r["id"])
    assert after == before
    found = Collection.open(folder, embedder=embedder).search("a red circle", k=1)
    assert found[0].path == "clip.mp4" and found[0].segment[0] <= found[0].t <= found[0].segment[1]
