"""Images under fsspec URLs: `vqret index s3://bucket/prefix --store DIR`, search, serve.

S3 is moto's server (real HTTP, s3fs talking to it through AWS_ENDPOINT_URL), with a WSGI
wrapper that records every request: an unchanged second run must cost the listing only.
memory:// covers the Python API and the server in-process.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import draw_shape, make_shape_folder
from vqret.retrieval.store import Store

N_IMAGES = 48
BUCKET = "shapes"
PREFIX = f"s3://{BUCKET}/photos"


# --------------------------------------------------------------------------------------------
# An S3 endpoint: moto's server, counting requests
# --------------------------------------------------------------------------------------------


class _Recorder:
    """WSGI middleware: (method, path, query) of every request moto answers."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.requests.append(
                (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("QUERY_STRING", ""))
            )
        return self.app(environ, start_response)

    def object_gets(self) -> list[str]:
        """Keys read with GET (listings are GETs on the bucket itself, with list-type=2)."""
        return sorted(p for m, p, _ in self.requests if m == "GET" and p.count("/") >= 2)

    def listings(self) -> int:
        return sum(1 for m, _, q in self.requests if m == "GET" and "list-type=2" in q)


@pytest.fixture(scope="module")
def s3():
    """(recorder, env for the CLI): a moto S3 server on a free port, for this module."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, recorder, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        # botocore's standard variables: what a user sets for MinIO, R2, or a real bucket
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process too: the server test reads the bucket in-process
    try:
        yield recorder, env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.shutdown()
        thread.join(timeout=10)


def _s3fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _png(color: str, shape: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    draw_shape(color, shape, np.random.default_rng(seed)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """The drawn shapes uploaded under s3://shapes/photos (half of them in a sub-prefix),
    plus a truncated PNG and a hidden file; returns the drawn rows by URL."""
    folder = tmp_path_factory.mktemp("upload")
    drawn = make_shape_folder(folder, N_IMAGES, seed=1234)
    fs = _s3fs()
    fs.mkdir(BUCKET)
    urls = {}
    for i, (path, caption, *_) in enumerate(drawn):
        key = f"{BUCKET}/photos/{'more/' if i % 2 else ''}{path.name}"
        fs.put_file(str(path), key)
        urls[f"s3://{key}"] = caption
    fs.pipe(f"{BUCKET}/photos/broken.png", drawn[0][0].read_bytes()[:60])
    fs.pipe(f"{BUCKET}/photos/.hidden.png", drawn[1][0].read_bytes())
    return urls


def _index(tiny_clip, store: Path, env, *extra: str) -> dict:
    return run_json("index", PREFIX, "--store", str(store), "--model", tiny_clip[0],
                    "--pretrained", tiny_clip[1], "--device", "cpu", *extra, env=env)


@pytest.fixture(scope="module")
def s3_store(s3, bucket, tiny_clip, tmp_path_factory):
    """A local store of the bucket, indexed once with the local engine: (store, report)."""
    recorder, env = s3
    store = tmp_path_factory.mktemp("s3store") / "photos.vqret"
    recorder.requests.clear()
    report = _index(tiny_clip, store, env)
    return store, report


# --------------------------------------------------------------------------------------------
# vqret index / search over S3
# --------------------------------------------------------------------------------------------


def test_s3_prefix_indexed_with_full_urls_and_searched(s3, bucket, s3_store):
    recorder, env = s3
    store, report = s3_store
    assert report["added"] == report["embedded"] == N_IMAGES
    assert [f["path"] for f in report["failed"]] == [f"{PREFIX}/broken.png"]
    results = run_json("search", "a red circle", "-k", "5", "--store", str(store), env=env)
    assert all(r["path"].startswith(PREFIX + "/") for r in results)
    # the fixture model finds red circles among 24 classes (2 of them in 48 images)
    assert bucket[results[0]["path"]] == "a red circle"
    assert Store(store).root_url == PREFIX and len(Store(store)) == N_IMAGES


def test_unchanged_bucket_costs_the_listing_only(s3, bucket, s3_store, tiny_clip):
    recorder, env = s3
    store, _ = s3_store
    recorder.requests.clear()
    report = _index(tiny_clip, store, env)
    assert report["unchanged"] == N_IMAGES and report["embedded"] == 0
    assert recorder.listings() >= 1
    # nothing unchanged is downloaded; the file that failed last run is retried (read again)
    assert set(recorder.object_gets()) == {f"/{BUCKET}/photos/broken.png"}

    # one object rewritten, one deleted, one added: only those are read
    fs = _s3fs()
    keys = sorted(u.removeprefix("s3://") for u in bucket)
    fs.pipe(keys[0], _png("blue", "star", 7))
    fs.rm(keys[1])
    fs.pipe(f"{BUCKET}/photos/more/new.png", _png("green", "square", 8))
    recorder.requests.clear()
    report = _index(tiny_clip, store, env)
    assert (report["updated"], report["removed"], report["added"]) == (1, 1, 1)
    assert report["embedded"] == 2 and report["unchanged"] == N_IMAGES - 2
    read = set(recorder.object_gets())
    assert read == {f"/{keys[0]}", f"/{BUCKET}/photos/more/new.png",
                    f"/{BUCKET}/photos/broken.png"}


def test_remote_store_and_missing_store_are_one_line_errors(s3, tiny_clip, tmp_path):
    _, env = s3
    remote = run_cli("index", PREFIX, "--store", "s3://shapes/store", check=False, env=env)
    assert remote.returncode == 1 and "must be a local folder" in remote.stderr
    assert len(remote.stderr.strip().splitlines()) == 1 and "Traceback" not in remote.stderr
    bare = run_cli("index", PREFIX, check=False, env=env)
    assert bare.returncode == 1 and "needs --store LOCAL_DIR" in bare.stderr
    missing = run_cli("index", "s3://no-such-bucket/x", "--store", str(tmp_path / "s"),
                      "--model", tiny_clip[0], "--pretrained", tiny_clip[1], check=False, env=env)
    assert missing.returncode == 1 and "s3://no-such-bucket/x" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_ray_engine_indexes_the_bucket_like_the_local_engine(s3, s3_store, tiny_clip, tmp_path):
    _, env = s3
    store, _ = s3_store
    ray_store = tmp_path / "ray.vqret"
    recorder, _ = s3
    recorder.requests.clear()
    report = _index(tiny_clip, ray_store, env, "--engine", "ray")
    local, remote = Store(store), Store(ray_store)
    assert report["added"] == len(local) and report["embedded"] == len(local)
    # A first run reads each object once: the actors hash what they download to embed
    # (the local engine reads each twice, to hash and to embed).
    gets = recorder.object_gets()
    assert len(gets) == len(set(gets)) == len(local) + 1  # + broken.png
    a = local.read_table(["path", "hash", "embedding"]).sort_by("path").to_pylist()
    b = remote.read_table(["path", "hash", "embedding"]).sort_by("path").to_pylist()
    assert [(r["path"], r["hash"]) for r in a] == [(r["path"], r["hash"]) for r in b]
    cosine = [np.dot(x["embedding"], y["embedding"]) for x, y in zip(a, b, strict=True)]
    assert min(cosine) >= 0.999


# --------------------------------------------------------------------------------------------
# The server streams remote originals and thumbnails
# --------------------------------------------------------------------------------------------


def test_server_streams_originals_and_thumbnails_from_s3(s3, s3_store, embedder):
    from PIL import Image
    from starlette.testclient import TestClient
    from vqret.retrieval.collection import Collection
    from vqret.retrieval.server import create_app

    store, _ = s3_store
    collection = Collection.open(store, embedder=embedder)
    rows = collection.store.read_table(["id", "path"]).to_pylist()
    app = create_app([collection])
    try:
        with TestClient(app) as client:
            name = client.get("/api/stores").json()[0]["name"]
            assert name == "photos"  # the URL's last part
            row = rows[0]
            original = client.get(f"/image/{name}/{row['id']}")
            assert original.status_code == 200 and original.headers["content-type"] == "image/png"
            assert original.content == _s3fs().cat_file(row["path"].removeprefix("s3://"))
            thumb = client.get(f"/thumb/{name}/{row['id']}")
            assert thumb.status_code == 200
            assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"
            hits = client.post("/api/search", json={"text": "a red circle", "k": 3}).json()
            assert hits["results"][0]["path"].startswith(PREFIX + "/")
            # an object deleted since indexing: a JSON 404, not a stack trace
            gone = next(r for r in rows if r["id"] != row["id"])
            _s3fs().rm(gone["path"].removeprefix("s3://"))
            missing = client.get(f"/image/{name}/{gone['id']}")
            assert missing.status_code == 404 and missing.json()["status"] == 404
    finally:
        app.state.service.close()


# --------------------------------------------------------------------------------------------
# Any fsspec filesystem through the Python API: memory://
# --------------------------------------------------------------------------------------------


def test_memory_urls_through_the_python_api(tmp_path, embedder):
    import fsspec
    from vqret.retrieval.collection import Collection
    from vqret.retrieval.store import StoreError

    fs = fsspec.filesystem("memory")
    drawn = make_shape_folder(tmp_path / "drawn", 24, seed=99)
    for path, *_ in drawn:
        fs.pipe(f"/album/{path.name}", path.read_bytes())
    with pytest.raises(StoreError, match="needs --store"):
        Collection.create("memory://album", embedder=embedder)
    # a filesystem fsspec doesn't know (or whose package is missing): one line, no store made
    with pytest.raises(StoreError, match="nosuchfs://album: .*nosuchfs"):
        Collection.create("nosuchfs://album", tmp_path / "never", embedder=embedder)
    assert not (tmp_path / "never").exists()
    collection = Collection.create("memory://album/", tmp_path / "s", embedder=embedder)
    report = collection.index()
    assert report.added == 24 and not report.failed
    hit = collection.search(text="a red circle", k=1)[0]
    assert hit.path.startswith("memory://album/")
    assert collection.resolve(hit) == hit.path
    # the same URL with or without the slash is the same store; another one is refused
    again = Collection.create("memory://album", tmp_path / "s", embedder=embedder)
    assert again.index().unchanged == 24
    with pytest.raises(StoreError, match="indexes memory://album"):
        Collection.create("memory://other", tmp_path / "s", embedder=embedder)
    fs.rm("/album", recursive=True)
