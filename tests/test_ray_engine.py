"""The Ray engine against the local one, on a local Ray with 2 CPUs.

One file past 500 lines: its tests share one local Ray per module, which takes seconds to start.

Ray is an optional extra (`pip install 'vqret[ray]'`), hence the importorskip; the test extra
installs it, so CI runs these. One Ray per module: starting it costs seconds.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import draw_shape, make_shape_folder

ray = pytest.importorskip("ray")

from vqret.retrieval.collection import Collection  # noqa: E402
from vqret.retrieval.content_hash import file_hash  # noqa: E402
from vqret.retrieval.distributed import cluster, embedding, indexing, sharded_index  # noqa: E402
from vqret.retrieval.embedder import ModelSpec  # noqa: E402
from vqret.retrieval.index import load_saved  # noqa: E402
from vqret.retrieval.indexer import index_folder  # noqa: E402
from vqret.retrieval.remote import FsspecSource, version_ns  # noqa: E402
from vqret.retrieval.store import (  # noqa: E402
    METADATA_COLUMNS,
    Store,
    embeddings_to_arrow,
    now_utc,
)
from vqret.retrieval.walk import walk_images  # noqa: E402

REPORT_KEYS = ("added", "updated", "removed", "renamed", "unchanged", "embedded", "failed")


def _cli_has_engine() -> bool:
    from vqret.cli.main import index

    return "engine" in inspect.signature(index).parameters


# The command-line tests wait for `vqret index --engine ray` (cli/main.py) to exist.
needs_cli_engine = pytest.mark.skipif(not _cli_has_engine(), reason="no `vqret index --engine`")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def folder(tmp_path) -> Path:
    """40 drawn images, a file that isn't an image and an empty one."""
    images = tmp_path / "images"
    make_shape_folder(images, 40, seed=77)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 10)
    (images / "empty.png").write_bytes(b"")
    return images


def _stores(tmp_path: Path, embedder, folder: Path) -> tuple[Store, Store]:
    # Outside the folder, so neither engine's walk sees the other's store.
    return (
        Store.create(tmp_path / "local.vqret", embedder.spec, folder),
        Store.create(tmp_path / "ray.vqret", embedder.spec, folder),
    )


def _driver_must_not_read(path, *args, **kwargs):
    raise AssertionError(f"the driver read {path}: the Ray engine hashes on the cluster")


HASH_JOBS: list[int] = []  # files in each Ray hash job of the last _run_both


def _run_both(local: Store, remote: Store, embedder, folder: Path) -> tuple[dict, dict]:
    a = index_folder(local, embedder, folder).to_dict()
    hash_files = embedding.RayEmbedder.hash_files
    HASH_JOBS.clear()

    def counted(self, paths):
        HASH_JOBS.append(len(paths))
        return hash_files(self, paths)

    # The Ray workers are other processes: patched here, only the driver's hashing breaks.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vqret.retrieval.hasher.file_hash", _driver_must_not_read)
        patch.setattr(embedding.RayEmbedder, "hash_files", counted)
        b = indexing.index_folder_with_ray(remote, remote.spec, folder, batch_size=16,
                                           text_embedder=embedder).to_dict()
    return {k: a[k] for k in REPORT_KEYS}, {k: b[k] for k in REPORT_KEYS}


def _assert_same_rows(local: Store, remote: Store) -> None:
    a = local.read_table().sort_by("id")
    b = remote.read_table().sort_by("id")
    for column in ("id", "path", "size", "mtime_ns", "hash", "width", "height"):
        assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    ea, eb = local.vectors()[1], remote.vectors()[1]
    ia, ib = local.vectors()[0], remote.vectors()[0]
    ea, eb = ea[np.argsort(ia)], eb[np.argsort(ib)]
    cosine = np.sum(ea * eb, axis=1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    assert cosine.min() >= 0.999
    assert [f.to_dict() for f in local.failures] == [f.to_dict() for f in remote.failures]


def _assert_same_search(local: Store, remote: Store, embedder, folder: Path) -> None:
    a, b = Collection(local, embedder), Collection(remote, embedder)
    for query in ("a red circle", "a blue star", "a green square"):
        ha, hb = a.search(text=query, k=10), b.search(text=query, k=10)
        assert [h.id for h in ha] == [h.id for h in hb], query
        assert np.allclose([h.score for h in ha], [h.score for h in hb], atol=1e-3)
    probe = sorted(folder.glob("*_purple_*.png"))[0]
    assert [h.id for h in a.search(image=probe, k=5)] == [h.id for h in b.search(image=probe,
                                                                                  k=5)]


def test_ray_engine_indexes_like_the_local_engine(local_ray, tmp_path, folder, embedder):
    local, remote = _stores(tmp_path, embedder, folder)

    # First run: everything is new; two files fail the same way in both.
    a, b = _run_both(local, remote, embedder, folder)
    assert a == b
    assert a["added"] == 40 and a["embedded"] == 40
    assert sorted(f["path"] for f in a["failed"]) == ["broken.jpg", "empty.png"]
    assert HASH_JOBS == []  # a first run: the actors hash what they read, no hash job
    _assert_same_rows(local, remote)  # hashes included
    _assert_same_search(local, remote, embedder, folder)

    # Second run after every kind of change: the same plan, ids and rows.
    files = sorted(folder.glob("0*.png"))
    files[0].unlink()
    files[1].unlink()  # removed
    files[2].rename(folder / "renamed.png")  # renamed: keeps its id and embedding
    shutil.copy(files[3], folder / "copy.png")  # duplicate: embedding copied, new id
    rng = np.random.default_rng(5)
    draw_shape("orange", "star", rng).save(files[4])  # modified: re-embedded under its id
    draw_shape("yellow", "circle", rng).save(folder / "broken.jpg", format="PNG")  # fixed
    (folder / "truncated.png").write_bytes(files[5].read_bytes()[:80])  # a new failure
    make_shape_folder(folder / "new", 5, seed=99)  # added
    a, b = _run_both(local, remote, embedder, folder)
    assert a == b
    assert (a["removed"], a["renamed"], a["updated"]) == (2, 1, 1)
    assert a["added"] == 1 + 1 + 5  # copy, fixed file, new folder
    assert a["embedded"] == 1 + 1 + 5  # modified, fixed file, new folder (the copy isn't)
    assert sorted(f["path"] for f in a["failed"]) == ["empty.png", "truncated.png"]
    # one hash job: renamed, copy, modified, fixed, truncated, 5 new; empty.png is unchanged
    # since it failed to decode, so it is reported from the record and not read again
    assert HASH_JOBS == [1 + 1 + 1 + 1 + 1 + 5]
    _assert_same_rows(local, remote)
    _assert_same_search(local, remote, embedder, folder)

    # Third run, nothing changed: nothing goes through the model (no Ray job at all).
    a, b = _run_both(local, remote, embedder, folder)
    assert a == b and a["embedded"] == 0 and a["unchanged"] == len(local)
    # empty.png and truncated.png are unchanged since they failed: reported, not read again
    assert HASH_JOBS == []
    assert sorted(f["path"] for f in a["failed"]) == ["empty.png", "truncated.png"]
    _assert_same_rows(local, remote)


def test_ray_workers_read_the_local_engines_metadata_columns(local_ray, tmp_path, embedder):
    """EXIF photos embedded on Ray get the local engine's metadata columns (read by the
    actors, from the bytes they decode), and an old store's upgrade reads its files'
    headers in Ray tasks, re-embedding nothing."""
    from test_metadata import exif_photo, make_schema_1

    folder = tmp_path / "photos"
    exif_photo(folder / "trip" / "tower.jpg", (320, 240), make="Google", model="Pixel 7",
               orientation=6, taken="2023:07:04 21:15:30", offset="+02:00", gps=(48.858, 2.294))
    exif_photo(folder / "old.jpg", (200, 100), make="Canon", taken="2009:12:24 18:00:00")
    make_shape_folder(folder / "shapes", 4, seed=3)
    local, remote = _stores(tmp_path, embedder, folder)
    columns = ["id", "width", "height", *METADATA_COLUMNS]

    def same_columns() -> None:
        a, b = (s.read_table(columns).sort_by("id").to_pylist() for s in (local, remote))
        assert a == b

    index_folder(local, embedder, folder)
    indexing.index_folder_with_ray(remote, remote.spec, folder, batch_size=16,
                                   text_embedder=embedder)
    same_columns()
    tower = remote.read_table(["path", "camera_model", "folder"]).to_pylist()
    assert {"path": "trip/tower.jpg", "camera_model": "Pixel 7", "folder": "trip"} in tower

    make_schema_1(remote)
    with pytest.MonkeyPatch.context() as patch:  # the driver reads no header: the tasks do
        patch.setattr("vqret.retrieval.metadata.read_facts", _driver_must_not_read)
        patch.setattr("vqret.retrieval.indexer.read_facts", _driver_must_not_read)
        report = indexing.index_folder_with_ray(remote, remote.spec, folder, batch_size=16,
                                                text_embedder=embedder)
    assert (report.upgraded, report.embedded) == (len(remote), 0)
    same_columns()


def test_fsspec_urls_list_hash_and_embed_like_the_folder(folder, embedder):
    source = FsspecSource(f"file://{folder}")
    walked = list(walk_images(folder))
    listed = list(source.walk())
    # listed entries are named by their full URL: the rows of a remote source keep it
    assert [(e.relpath, e.size) for e in listed] == [
        (f"file://{folder}/{e.relpath}", e.size) for e in walked
    ]
    assert source.hash(listed[0].relpath) == file_hash(folder / walked[0].relpath)
    assert source.path(listed[0].relpath) == listed[0].relpath

    rels = ["broken.jpg"] + [e.relpath for e in walked if e.relpath.endswith(".png")][:7]
    urls = [source.path(r) for r in rels]
    assert urls[0] == f"file://{folder}/broken.jpg"
    # The actor's code, run here: a Ray job would only add a worker start-up to this test.
    plan = {"device": "cpu", "num_cpus": 1}
    worker = embedding.RayEmbedder(embedder.spec, batch_size=16)._worker_class(plan)()
    out = worker({"position": np.arange(len(urls)), "path": np.array(urls, dtype=object)})
    got = embedding._to_image_batch(out, embedder.embed_dim)
    [local] = list(embedder.iter_image_files([str(folder / r) for r in rels]))
    assert got.indices == local.indices and got.sizes == local.sizes
    assert got.failures == local.failures and [i for i, _ in got.failures] == [0]
    assert np.sum(got.embeddings * local.embeddings, axis=1).min() >= 0.999


def test_ray_hashing_gives_the_local_digest_and_causes(folder):
    """What a hash task computes for a file, a URL and a file that vanished, against the
    driver's own hashing (the task's code run here, as in the test above)."""
    names = [str(folder / "broken.jpg"), f"file://{folder}/empty.png", str(folder / "gone.png")]
    out = embedding._hash_rows({"position": np.arange(3), "path": np.array(names, object)})
    assert list(out["position"]) == [0, 1, 2]
    assert list(out["hash"][:2]) == [file_hash(folder / "broken.jpg"), file_hash(folder /
                                                                                 "empty.png")]
    assert out["hash"][2] == "" and out["error"][2] == "unreadable (No such file or directory)"
    assert list(out["error"][:2]) == ["", ""]


def test_version_stamps_from_object_store_listings():
    from datetime import datetime, timezone

    stamp = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    ns = int(stamp.timestamp() * 1e9)
    assert version_ns({"LastModified": stamp}) == ns  # s3fs
    assert version_ns({"updated": "2024-05-01T12:00:00Z"}) == ns  # gcsfs
    assert version_ns({"mtime": 1714564800.0}) == ns  # local, sftp
    a, b = version_ns({"ETag": '"abc"'}), version_ns({"ETag": '"abd"'})
    assert a != b and 0 < a < 2**63  # no time: the ETag still shows a change


# --------------------------------------------------------------------------------------------
# Sharded index building
# --------------------------------------------------------------------------------------------


def _vector_store(tmp_path: Path, n: int, dim: int = 32, part_rows: int = 500) -> Store:
    """A store of `n` clustered unit vectors in parts of `part_rows` rows (no images)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, dim))
    vectors = centers[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    spec = ModelSpec("none", "none", "none", dim)
    (tmp_path / "root").mkdir(parents=True, exist_ok=True)
    store = Store.create(tmp_path / "vectors.vqret", spec, tmp_path / "root")
    with store.writer() as writer:
        for start in range(0, n, part_rows):
            chunk = vectors[start : start + part_rows]
            ids = writer.allocate_ids(len(chunk))
            writer.commit(
                pa.table(
                    {
                        "id": pa.array(ids, pa.int64()),
                        "path": [f"{i}.png" for i in ids],
                        "embedding": embeddings_to_arrow(chunk),
                        "added_at": pa.array([now_utc()] * len(chunk), pa.timestamp("us", "UTC")),
                    }
                )
            )
    return store


def _list_ids(index: faiss.Index) -> dict[int, set[int]]:
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    return {
        i: set(faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).tolist())
        for i in range(ivf.nlist)
        if lists.list_size(i)
    }


def test_sharded_index_holds_what_one_process_would(local_ray, tmp_path):
    store = _vector_store(tmp_path, 3000)
    assert len(store.parts()) == 6
    with store.writer():
        plan = sharded_index.build_sharded_index(store, "ivf", rows_per_shard=1000)
    assert plan.kind == "ivf" and plan.trained_n == 3000
    saved = load_saved(store)  # saved for the current generation: readers use it as it is
    assert saved is not None
    index, meta = saved
    assert index.ntotal == 3000 and meta["asked"] == "ivf"
    assert not list(store.path.glob(".tmp-*"))  # the shards' files, merged and removed

    # Every vector sits in the list its quantizer assigns it to, exactly once: what adding
    # all of them in one process to the same trained index gives.
    ids, vectors = store.vectors()
    _, assigned = faiss.extract_index_ivf(index).quantizer.search(vectors, 1)
    expected: dict[int, set[int]] = {}
    for i, lst in zip(ids.tolist(), assigned[:, 0].tolist(), strict=True):
        expected.setdefault(lst, set()).add(i)
    assert _list_ids(index) == expected

    # The recall it reports (against the shard-by-shard exact top-10) is real.
    assert plan.recall_at_10 >= 0.95
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    queries = vectors[::15]
    truth = ids[exact.search(queries, 10)[1]]
    found = index.search(queries, 10)[1]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]) >= 0.9
    hits = Collection(store).search(embedding=vectors[7], k=3)
    assert hits[0].id == ids[7]

    # Grown by less than RETRAIN_GROWTH: rebuilt with the same quantizer, not retrained.
    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, plan.nlist)
    extra = _vector_store(tmp_path / "more", 400, part_rows=400).vectors()[1]
    with store.writer() as writer:
        new_ids = writer.allocate_ids(len(extra))
        writer.commit(pa.table({
            "id": pa.array(new_ids, pa.int64()),
            "path": [f"{i}.png" for i in new_ids],
            "embedding": embeddings_to_arrow(extra),
            "added_at": pa.array([now_utc()] * len(extra), pa.timestamp("us", "UTC")),
        }))
        again = sharded_index.ray_update_index(store, sharded_above=0, rows_per_shard=1000)
    assert again.trained_n == 3000 and again.factory == plan.factory
    index2 = load_saved(store)[0]
    assert index2.ntotal == 3400
    same = faiss.extract_index_ivf(index2).quantizer.reconstruct_n(0, plan.nlist)
    assert np.array_equal(centroids, same)


def test_topk_merge_equals_exact_search():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((900, 16)).astype(np.float32)
    ids = np.arange(900, dtype=np.int64) * 3 + 1
    queries = vectors[:20]
    scores = np.full((20, 10), -np.inf, np.float32)
    found = np.full((20, 10), -1, np.int64)
    for part in np.array_split(np.arange(900), 4):
        s, p = faiss.knn(queries, vectors[part], 10, metric=faiss.METRIC_INNER_PRODUCT)
        scores, found = sharded_index.merge_topk(scores, found, s, ids[part][p], 10)
    exact = faiss.IndexFlatIP(16)
    exact.add(vectors)
    assert np.array_equal(found, ids[exact.search(queries, 10)[1]])


@pytest.mark.parametrize("factory", ["IVF16,SQfp16", "IVF16,SQ6", "PCA16,IVF8,Flat"])
def test_merging_shards_equals_adding_in_one_index(factory):
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    ids = rng.permutation(10_000)[:2000].astype(np.int64)
    trained = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(vectors)
    blob = faiss.serialize_index(trained)
    whole = faiss.deserialize_index(blob)
    whole.add_with_ids(vectors, ids)
    shards = []
    for part in np.array_split(np.arange(2000), 3):
        shard = faiss.deserialize_index(blob)
        shard.add_with_ids(vectors[part], ids[part])
        shards.append(shard)
    merged = shards[0]
    for shard in shards[1:]:
        sharded_index.merge_into(merged, shard)
    assert merged.ntotal == 2000
    for index in (whole, merged):
        faiss.extract_index_ivf(index).nprobe = 4
    assert np.array_equal(whole.search(vectors[:50], 10)[1], merged.search(vectors[:50], 10)[1])


def test_without_ray_the_message_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(cluster.RayUnavailableError) as caught:
        cluster.require_ray()
    message = str(caught.value)
    assert "pip install 'vqret[ray]'" in message and "\n" not in message


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@needs_cli_engine
def test_cli_engine_ray_on_a_running_cluster(local_ray, tmp_path, folder, tiny_clip, embedder):
    # --address: this module's Ray, so the command joins a cluster instead of starting one.
    address = ray.get_runtime_context().gcs_address
    store = tmp_path / "cli.vqret"
    report = run_json("index", str(folder), "--store", str(store), "--model", tiny_clip[0],
                      "--pretrained", tiny_clip[1], "--device", "cpu", "--engine", "ray",
                      "--address", address, "-b", "16", "--workers", "1")
    assert (report["added"], report["embedded"]) == (40, 40)
    # --workers caps the actor pool; the report says what ran and one actor's rate
    ray_run = report["ray"]
    assert (ray_run["actors"], ray_run["device"], ray_run["images"]) == (1, "cpu", 42)
    assert ray_run["images_per_actor_second"] > 0
    assert sorted(f["path"] for f in report["failed"]) == ["broken.jpg", "empty.png"]
    local = Store.create(tmp_path / "local.vqret", embedder.spec, folder)
    index_folder(local, embedder, folder)
    _assert_same_rows(local, Store(store))


def test_an_address_where_no_cluster_answers_is_one_line_in_seconds(tmp_path, folder,
                                                                    tiny_clip):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tmp_path / "s.vqret"
    args = ["index", str(folder), "--store", str(store), "--model", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--device", "cpu", "--engine", "ray"]
    run_cli(*args[:-2])  # indexed locally first: the failed run must leave it as it is
    before = Store(store).read_table(["id", "path", "hash"]).sort_by("id").to_pylist()
    (folder / "new.png").write_bytes((sorted(folder.glob("0*.png"))[0]).read_bytes())
    for address, expected in ((f"127.0.0.1:{port}", "nothing answers there"),
                              ("head-node", "expected auto, HOST:PORT")):
        result = run_cli(*args, "--address", address, check=False)
        assert result.returncode == 1 and expected in result.stderr
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error")]
        assert len(lines) == 1 and "Traceback" not in result.stderr
    assert Store(store).read_table(["id", "path", "hash"]).sort_by("id").to_pylist() == before


@needs_cli_engine
def test_cli_without_ray_says_how_to_install_it(tmp_path, folder):
    fake = tmp_path / "no-ray" / "ray"  # first on the path: `import ray` fails as if absent
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    proc = run_cli("index", str(folder), "--engine", "ray", check=False,
                   env={"PYTHONPATH": path})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --engine ray needs Ray with Ray Data: pip install 'vqret[ray]'"
    ]


def test_actor_plan_follows_the_cluster(monkeypatch, embedder):
    """One actor per GPU with its share of CPUs for decoding; one per CPU without GPUs; never
    more actors than batches. (What the actors then do on a GPU can't run here.)"""
    def plan(resources, n_paths, **options):
        monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
        return embedding.RayEmbedder(embedder.spec, batch_size=64, **options)._plan(n_paths)

    gpus = {"CPU": 64.0, "GPU": 4.0}
    assert plan(gpus, 100_000) == {"actors": 4, "num_gpus": 1, "num_cpus": 8.0,
                                   "device": "cuda"}
    assert plan({"CPU": 12.0, "GPU": 4.0}, 100_000)["num_cpus"] == 3.0
    assert plan(gpus, 100)["actors"] == 2  # 100 files: two batches of 64
    assert plan(gpus, 100_000, device="cpu") == {"actors": 64, "num_gpus": 0, "num_cpus": 1.0,
                                                 "device": "cpu"}
    assert plan({"CPU": 16.0}, 100_000, num_workers=3)["actors"] == 3
    with pytest.raises(ValueError, match="no GPU"):
        plan({"CPU": 16.0}, 100_000, device="cuda")


def test_an_actor_that_cannot_load_the_model_is_one_line(local_ray, tmp_path, folder, tiny_clip):
    """Every node needs the weights: an actor on a node without them ends the run with the
    cause in one line, not Ray's remote traceback."""
    spec = ModelSpec(tiny_clip[0], str(tmp_path / "not-on-this-node.safetensors"), "x", 64)
    embedder = embedding.RayEmbedder(spec, batch_size=16)
    with pytest.raises(cluster.RayWorkerError) as caught:
        list(embedder.iter_image_files([str(p) for p in sorted(folder.glob("*.png"))[:4]]))
    message = str(caught.value)
    assert message.startswith("an embedding actor failed on Ray: WeightsUnavailableError: "
                              "weights file not found:")
    assert "not-on-this-node.safetensors" in message and "\n" not in message


def test_an_unreachable_address_fails_before_ray_retries(monkeypatch):
    """Ray retries an unreachable GCS for minutes: connect() must fail on one socket attempt,
    with a bounded timeout, and never call ray.init (checked without timing anything)."""
    import ray
    from vqret.retrieval.distributed import cluster

    attempts = []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called for an address nothing answers at")

    monkeypatch.setattr(cluster.socket, "create_connection", refuse)
    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(cluster.ClusterUnreachableError, match="nothing answers there"):
        cluster.connect("10.0.0.9:6379")
    assert attempts == [(("10.0.0.9", 6379), 5.0)]
