"""Images under fsspec URLs: `vqret index s3://bucket/prefix --store DIR`, search, serve.

S3 is moto's server (real HTTP, s3fs talking to it through AWS_ENDPOINT_URL), with a WSGI
wrapper that records every request: an unchanged second run must cost the listing only.
memory:// covers the Python API and the server in-process.
"""

from __future__ import annotations

import io
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import draw_shape, make_shape_folder
from vqret.retrieval import remote
from vqret.retrieval.remote import FsspecSource, version_ns
from vqret.retrieval.store import Store, StoreError

N_IMAGES = 48
BUCKET = "shapes"
PREFIX = f"s3://{BUCKET}/photos"


# --------------------------------------------------------------------------------------------
# An S3 endpoint: moto's server, counting requests
# --------------------------------------------------------------------------------------------


class _Recorder:
    """WSGI middleware: (method, path, query) of every request moto answers. With
    `deny_next_pages` set, a listing's second and later pages are refused (403), as an
    outage or a token expiring halfway through a long listing would."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, str, str]] = []
        self.deny_next_pages = False
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        query = environ.get("QUERY_STRING", "")
        with self._lock:
            self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], query))
        if self.deny_next_pages and "list-type=2" in query and "continuation-token" in query:
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                    b"<Message>Access Denied</Message></Error>"]
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
    assert recorder.listings() == 1  # one page: the listing, streamed, and nothing per object
    # nothing unchanged is downloaded, not even the object that failed to decode last run:
    # it is unchanged since, so it is reported from the record
    assert recorder.object_gets() == []
    assert [f["path"] for f in report["failed"]] == [f"{PREFIX}/broken.png"]

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
    assert read == {f"/{keys[0]}", f"/{BUCKET}/photos/more/new.png"}


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
# The listing is streamed: a page (S3) or a folder (other filesystems) at a time
# --------------------------------------------------------------------------------------------

# Objects under a prefix, and the images a walk yields from them, in the order one sorted
# listing of their full paths gives: "-" < "." < "/" puts a-b.png and a.png before the
# folder a/, capitals before small letters, é after ASCII.
TREE = [
    "a/b.png", "a/c/d.PNG", "a-b.png", "a.png", "Z.jpg", "é.png", "b/ok.jpeg", "b/readme",
    "b/.hidden.png", ".cache/x.png", "node_modules/x.png", "@eaDir/x.jpg", "notes.txt",
    "z/y/x/w.webp",
]
TREE_IMAGES = ["Z.jpg", "a-b.png", "a.png", "a/b.png", "a/c/d.PNG", "b/ok.jpeg", "z/y/x/w.webp",
               "é.png"]


@pytest.fixture(scope="module")
def tree(s3, bucket):
    """TREE under s3://shapes/tree (object i has i + 1 bytes), plus a folder marker."""
    _s3fs().pipe({f"{BUCKET}/tree/{name}": b"x" * (i + 1) for i, name in enumerate(TREE)}
                 | {f"{BUCKET}/tree/empty/": b""})
    return f"s3://{BUCKET}/tree"


def test_s3_listing_streams_a_page_at_a_time_in_name_order(s3, tree, monkeypatch):
    recorder, _ = s3
    # pages of 3 objects, from moto and taken by the walk (S3 and the walk use 1000)
    monkeypatch.setenv("MOTO_S3_DEFAULT_MAX_KEYS", "3")
    monkeypatch.setattr(remote, "LIST_PAGE", 3)
    recorder.requests.clear()
    walk = FsspecSource(tree).walk()
    first = next(walk)
    assert recorder.listings() == 1  # the first image came with the first page
    entries = [first, *walk]
    assert [e.relpath for e in entries] == [f"{tree}/{name}" for name in TREE_IMAGES]
    assert recorder.listings() == math.ceil((len(TREE) + 1) / 3)
    assert not recorder.object_gets()  # nothing per object

    # the same requests, sizes and version stamps as the whole listing fs.find() returns
    recorder.requests.clear()
    found = _s3fs().find(tree.removeprefix("s3://"), detail=True)
    assert recorder.listings() == math.ceil((len(TREE) + 1) / 3)
    keys = [f"{BUCKET}/tree/{name}" for name in TREE_IMAGES]
    assert [(e.size, e.mtime_ns) for e in entries] == [
        (found[k]["size"], version_ns(found[k])) for k in keys
    ]
    assert [e.size for e in entries] == [TREE.index(name) + 1 for name in TREE_IMAGES]


def test_s3_listing_out_of_name_order_is_refused(s3, monkeypatch):
    # S3 sorts every listing; an endpoint that doesn't would make the Indexer's ids
    # follow its order unseen (the whole listing is no longer held to be sorted)
    source = FsspecSource(f"s3://{BUCKET}/unsorted")

    async def unsorted(bucket, **kw):
        for name in ("b.png", "a.png"):
            yield {"name": f"{bucket}/unsorted/{name}", "size": 1, "ETag": name}

    monkeypatch.setattr(source.fs, "_iterdir", unsorted)
    walk = source.walk()
    assert next(walk).relpath == f"s3://{BUCKET}/unsorted/b.png"
    with pytest.raises(StoreError, match="not in name order .*a.png after .*b.png"):
        next(walk)


@pytest.mark.parametrize("protocol", ["memory", "file"])
def test_folder_by_folder_walk_gives_the_order_of_one_sorted_listing(protocol, tmp_path,
                                                                    monkeypatch):
    import fsspec

    fs = fsspec.filesystem(protocol)
    root = f"/walk-{os.getpid()}" if protocol == "memory" else str(tmp_path / "walk")
    for i, name in enumerate(TREE):
        fs.makedirs(f"{root}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe(f"{root}/{name}", b"x" * (i + 1))
    fs.makedirs(f"{root}/empty", exist_ok=True)
    url = f"{protocol}://{root}"
    try:
        listed: list[str] = []
        ls = fs.ls
        monkeypatch.setattr(fs, "ls", lambda path, **kw: listed.append(path) or ls(path, **kw))
        entries = list(FsspecSource(url).walk())
        assert [e.relpath for e in entries] == [f"{url}/{name}" for name in TREE_IMAGES]
        assert [e.size for e in entries] == [TREE.index(name) + 1 for name in TREE_IMAGES]
        # hidden and bookkeeping folders are not even listed
        assert not [p for p in listed if any(s in p for s in (".cache", "node_modules", "@eaDir"))]

        # a folder that can't be listed halfway through: StoreError, not a shorter listing
        # (fs.find omitted such a folder silently, so its images read as deleted)
        def failing(path, **kw):
            if path.rstrip("/").endswith("/z/y"):
                raise PermissionError(13, "Permission denied")
            return ls(path, **kw)

        monkeypatch.setattr(fs, "ls", failing)
        walk = FsspecSource(url).walk()
        assert next(walk).relpath == f"{url}/Z.jpg"
        with pytest.raises(StoreError, match=f"{url}: can't list .*Permission denied"):
            list(walk)
    finally:
        monkeypatch.undo()
        fs.rm(root, recursive=True)
    with pytest.raises(StoreError, match="no such folder or prefix"):
        list(FsspecSource(url).walk())


def test_listing_failing_after_its_first_page_leaves_the_store_untouched(s3, s3_store,
                                                                        tiny_clip, monkeypatch):
    recorder, env = s3
    store, _ = s3_store
    before = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    rows = Store(store).read_table().sort_by("id")
    monkeypatch.setenv("MOTO_S3_DEFAULT_MAX_KEYS", "10")  # ~50 objects: several pages
    recorder.requests.clear()
    recorder.deny_next_pages = True
    try:
        result = run_cli("index", PREFIX, "--store", str(store), "--model", tiny_clip[0],
                         "--pretrained", tiny_clip[1], "--device", "cpu", check=False, env=env)
    finally:
        recorder.deny_next_pages = False
    assert recorder.listings() == 2  # the first page listed, the second refused
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"{PREFIX}: can't list" in result.stderr and "Access Denied" in result.stderr
    assert {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()} == before
    assert Store(store).read_table().sort_by("id").equals(rows)


# --------------------------------------------------------------------------------------------
# The server streams remote originals and thumbnails
# --------------------------------------------------------------------------------------------


def test_server_streams_originals_and_thumbnails_from_s3(s3, s3_store, embedder):
    from PIL import Image
    from starlette.testclient import TestClient
    from vqret import Collection
    from vqret.server.app import create_app

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
    from vqret import Collection
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
