"""`vqret serve`'s HTTP API, in process, on a store indexed with the fixture model."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("multipart")

from PIL import Image  # noqa: E402
from serve_helpers import (  # noqa: E402
    DUPLICATE,
    assert_json_error,
    knn,
    live_server,
    path_of,
    png_bytes,
)
from starlette.testclient import TestClient  # noqa: E402
from vqret.retrieval.engine import unique_mask  # noqa: E402
from vqret.server.app import create_app  # noqa: E402
from vqret.server.guard import loopback_hosts  # noqa: E402

# ------------------------------------------------------------------------------------------
# Our JSON API
# ------------------------------------------------------------------------------------------


def test_text_search_answers_red_circles_with_urls(client):
    r = client.post("/api/search", json={"text": "a red circle", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["store"] == "shapes"  # the indexed folder's name
    assert body["query"].items() >= {"type": "text", "text": "a red circle"}.items()
    assert body["generated"] is None and body["k"] == 5 and body["took_ms"] >= 0
    results = body["results"]
    assert [h["rank"] for h in results] == [1, 2, 3, 4, 5]
    assert sum("red_circle" in h["path"] for h in results) >= 4
    assert "red_circle" in results[0]["path"]
    scores = [h["score"] for h in results]
    assert scores == sorted(scores, reverse=True)
    first = results[0]
    assert first["thumbnail_url"] == f"/thumb/shapes/{first['id']}"
    assert first["original_url"] == f"/image/shapes/{first['id']}"


def test_http_scores_equal_in_process_search(client, shapes):
    collection, _ = shapes
    expected = collection.search(text="a blue star", k=8)
    body = client.get("/api/search", params={"text": "a blue star", "k": 8}).json()
    assert [h["id"] for h in body["results"]] == [h.id for h in expected]
    assert np.allclose([h["score"] for h in body["results"]], [h.score for h in expected])


def test_image_upload_multipart_and_base64(client):
    data = png_bytes("green", "triangle")
    r = client.post(
        "/api/search", files={"image": ("q.png", data, "image/png")}, data={"k": "5"}
    )
    assert r.status_code == 200, r.text
    multipart = r.json()
    assert multipart["query"].items() >= {"type": "image"}.items()  # and the terms, k, ...
    assert sum("green_triangle" in h["path"] for h in multipart["results"]) >= 4
    as_data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    r = client.post("/api/search", json={"image": as_data_url, "k": 5})
    assert [h["id"] for h in r.json()["results"]] == [h["id"] for h in multipart["results"]]


def test_more_like_this_excludes_the_image_itself(client, shapes):
    collection, drawn = shapes
    target = next(i for i, row in enumerate(drawn) if row[3] == "square")  # file order = id
    r = client.post("/api/search", json={"like": target, "k": 4})
    body = r.json()
    assert body["query"].items() >= {"type": "like", "id": target}.items()  # and the terms, k, ...
    ids = [h["id"] for h in body["results"]]
    assert target not in ids and len(ids) == 4
    color = drawn[target][2]
    assert sum(f"{color}_square" in h["path"] for h in body["results"]) >= 3
    # GET works too (handy from a shell), and agrees
    assert [h["id"] for h in client.get(f"/api/search?like={target}&k=4").json()["results"]] == ids


def test_embedding_query_matches_text_query(client, embedder):
    vector = embedder.embed_texts(["a yellow square"])[0]
    by_text = client.post("/api/search", json={"text": "a yellow square", "k": 5}).json()
    by_vector = client.post(
        "/api/search", json={"embedding": (3 * vector).tolist(), "k": 5}  # scale: normalised
    ).json()
    assert [h["id"] for h in by_vector["results"]] == [h["id"] for h in by_text["results"]]


def test_deduplicate_drops_the_copy(client, shapes):
    collection, _ = shapes
    original = collection.store.root / "00000_red_circle.png"
    encoded = base64.b64encode(original.read_bytes()).decode()
    plain = client.post("/api/search", json={"image": encoded, "k": 6}).json()["results"]
    paths = [h["path"] for h in plain]
    assert {"00000_red_circle.png", DUPLICATE} <= set(paths[:2])
    deduped = client.post(
        "/api/search", json={"image": encoded, "k": 6, "deduplicate": True}
    ).json()["results"]
    assert len(deduped) == 6 and deduped[0]["id"] == plain[0]["id"]
    kept = [h["path"] for h in deduped]
    assert not ({"00000_red_circle.png", DUPLICATE} <= set(kept))


def test_unique_mask_keeps_the_better_of_near_duplicates():
    a = np.array([1.0, 0.0, 0.0])
    near_a = np.array([0.99, 0.14, 0.0]) / np.linalg.norm([0.99, 0.14, 0.0])
    b = np.array([0.0, 1.0, 0.0])
    assert unique_mask(np.stack([a, near_a, b]).astype(np.float32)).tolist() == [
        True,
        False,
        True,
    ]


def test_concurrent_requests_get_the_answers_of_sequential_ones(shapes, app):
    import httpx

    colors, kinds = ("red", "blue", "green", "purple"), ("circle", "star")
    captions = [f"a {c} {s}" for c in colors for s in kinds]
    with live_server(app) as url, httpx.Client(base_url=url) as http:
        expected = {
            c: [h["id"] for h in http.get("/api/search", params={"text": c}).json()["results"]]
            for c in captions
        }
        uploads = {c: png_bytes(*c.split()[1:]) for c in captions[:4]}

        def ask(i: int):
            with httpx.Client(base_url=url, timeout=300) as own:
                caption = captions[i % len(captions)]
                if i % 3 == 2 and caption in uploads:
                    files = {"image": ("q.png", uploads[caption], "image/png")}
                    r = own.post("/api/search", files=files)
                    return None, r.status_code
                r = own.get("/api/search", params={"text": caption})
                return caption, r.status_code, [h["id"] for h in r.json()["results"]]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(48)))
    assert all(a[1] == 200 for a in answers)
    for answer in answers:
        if answer[0] is not None:
            assert answer[2] == expected[answer[0]]
    health = app.state.service.stores["shapes"].batcher
    assert health.items >= health.batches > 0


# ------------------------------------------------------------------------------------------
# Files by id
# ------------------------------------------------------------------------------------------


def test_thumbnail_and_original_by_id(client, shapes):
    collection, _ = shapes
    r = client.get("/thumb/shapes/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    etag = r.headers["etag"]
    assert client.get("/thumb/shapes/3", headers={"If-None-Match": etag}).status_code == 304
    r = client.get("/image/shapes/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (collection.store.root / path_of(collection, 3)).read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "url",
    [
        "/thumb/shapes/999999",
        "/image/shapes/999999",
        "/image/shapes/-1",
        "/image/shapes/abc",
        "/image/shapes/99999999999999999999999999",
        "/image/nope/1",
        "/image/shapes/..%2F..%2F..%2Fetc%2Fpasswd",
        "/image/shapes/%2e%2e/%2e%2e/etc/passwd",
        "/image/..%2F..%2Fetc/1",
        "/image/shapes/1/../../../../etc/passwd",
        "/static/../../pyproject.toml",
        "/static/%2e%2e%2fservice.py",
        "/static/index.html",
        "/no/such/route",
    ],
)
def test_files_are_found_by_id_only(client, url):
    assert_json_error(client.get(url), 404)


def test_a_file_gone_from_disk_is_a_404(client, shapes):
    collection, _ = shapes
    path = collection.store.root / path_of(collection, 7)
    moved = path.with_name(".moved-away")
    path.rename(moved)
    try:
        assert "gone" in assert_json_error(client.get("/image/shapes/7"), 404)
        assert_json_error(client.get("/thumb/shapes/7"), 404)
    finally:
        moved.rename(path)


# ------------------------------------------------------------------------------------------
# Bad input: always a 4xx with a JSON error
# ------------------------------------------------------------------------------------------


BAD_JSON_SEARCHES = [
    ({}, 400, "no query"),
    ({"text": ""}, 400, "empty"),
    ({"text": "   "}, 400, "empty"),
    ({"text": 5}, 400, "string"),
    ({"text": "x" * 5000}, 400, "longer"),
    ({"text": "a red circle", "k": 0}, 400, "k"),
    ({"text": "a red circle", "k": "many"}, 400, "k"),
    ({"text": "a red circle", "k": 10**9}, 400, "k"),
    ({"text": "a red circle", "k": True}, 400, "k"),
    ({"text": "a red circle", "store": "nope"}, 404, "unknown store"),
    ({"text": "a red circle", "store": ["shapes"]}, 404, "unknown store"),
    ({"text": "a red circle", "image": "aGk="}, 400, "exactly one"),
    ({"like": 999999}, 404, "no image"),
    ({"like": -1}, 400, "like"),
    ({"like": "abc"}, 400, "like"),
    ({"embedding": [1.0, 2.0]}, 400, "numbers"),
    ({"embedding": [0.0] * 64}, 400, "non-zero"),
    ({"embedding": "1,2,3"}, 400, "list"),
    ({"embedding": [True] * 64}, 400, "list"),
    ({"image": "@@not base64@@"}, 400, "image"),
    ({"image": base64.b64encode(b"just some text").decode()}, 400, "not an image"),
    ({"image": 12}, 400, "base64"),
    ({"image_url": "http://127.0.0.1:9/x.png"}, 403, "--allow-url-queries"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD_JSON_SEARCHES)
def test_bad_searches_are_4xx_json(client, body, status, words):
    assert words in assert_json_error(client.post("/api/search", json=body), status)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "object"),
        (b"\xff\xfe", ""),
        (b'{"text": "a red circle", "k": 1e400}', "k"),
        (b'{"embedding": [NaN' + b", 1" * 63 + b"]}", "finite"),
    ],
)
def test_unreadable_bodies_are_400(client, content, words):
    r = client.post("/api/search", content=content, headers={"content-type": "application/json"})
    assert words in assert_json_error(r, 400)


def test_bad_uploads_are_400(client):
    r = client.post("/api/search", files={"image": ("a.txt", b"hello", "text/plain")})
    assert "not an image" in assert_json_error(r, 400)
    r = client.post("/api/search", files={"image": ("a.png", b"", "image/png")})
    assert "empty" in assert_json_error(r, 400)
    r = client.post("/api/search", files={"other": ("a.png", png_bytes("red", "star"))})
    assert "image" in assert_json_error(r, 400)
    r = client.post("/api/search", data={"image": "not a file"}, files={"x": ("", b"")})
    assert_json_error(r, 400)
    truncated = png_bytes("red", "star")[:200]
    r = client.post("/api/search", files={"image": ("t.png", truncated, "image/png")})
    assert_json_error(r, 400)


def test_methods_not_allowed_are_405_json(client):
    assert_json_error(client.delete("/api/search"), 405)
    assert_json_error(client.get("/knn-service"), 405)


def test_oversized_bodies_are_413(shapes):
    collection, _ = shapes
    small = create_app([collection], max_body_bytes=2000, warm=False)
    try:
        with TestClient(small) as client:
            big = {"text": "a red circle", "pad": "x" * 5000}
            assert_json_error(client.post("/api/search", json=big), 413)
            # No Content-Length (chunked): counted as it arrives.
            chunks = (b"x" * 1000 for _ in range(10))
            assert_json_error(client.post("/knn-service", content=chunks), 413)
            upload = {"image": ("q.png", b"\x89PNG" + b"0" * 5000, "image/png")}
            assert_json_error(client.post("/api/search", files=upload), 413)
            assert client.post("/api/search", json={"text": "a red circle"}).status_code == 200
    finally:
        small.state.service.close()


def test_host_header_is_checked_when_asked(shapes):
    collection, _ = shapes
    guarded = create_app([collection], allowed_hosts=loopback_hosts("127.0.0.1"), warm=False)
    try:
        with TestClient(guarded) as client:
            assert_json_error(client.get("/healthz"), 400)  # Host: testserver
            for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
                assert client.get("/healthz", headers={"host": host}).status_code == 200
    finally:
        guarded.state.service.close()


# ------------------------------------------------------------------------------------------
# Stores
# ------------------------------------------------------------------------------------------


def test_healthz_and_stores(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["stores"] == {"shapes": 121}
    (store,) = client.get("/api/stores").json()
    assert store["name"] == "shapes" and store["images"] == 121 and store["dim"] == 64
    assert store["model"] == "tiny-clip"


def test_several_stores_share_one_model(shapes, tmp_path):
    from vqret import Collection
    from vqret.retrieval.store import StoreError

    collection, _ = shapes
    folder = collection.store.root
    with pytest.raises(StoreError, match="two stores are named 'shapes'"):
        create_app([folder, folder], device="cpu", warm=False)
    mixed = create_app([("x", folder), collection.store.path], device="cpu", warm=False)
    assert list(mixed.state.service.stores) == ["x", "shapes"]
    mixed.state.service.close()
    odd = "my photos 100% {ok}"  # names go into URLs: they must come out quoted
    both = create_app({"a": folder, odd: collection.store.path}, device="cpu", warm=False)
    try:
        service = both.state.service
        assert service.stores["a"].batcher is service.stores[odd].batcher  # one model
        assert isinstance(service.stores["a"].collection, Collection)
        with TestClient(both) as client:
            assert client.get("/indices-list").json() == ["a", odd]
            assert "several stores" in assert_json_error(
                client.post("/api/search", json={"text": "a red circle"}), 400
            )
            ok = client.post("/api/search", json={"text": "a red circle", "store": odd})
            assert ok.json()["store"] == odd
            first = ok.json()["results"][0]
            assert first["thumbnail_url"] == f"/thumb/my%20photos%20100%25%20%7Bok%7D/{first['id']}"
            assert client.get(first["thumbnail_url"]).status_code == 200
            assert client.get(first["original_url"]).status_code == 200
            rows = knn(client, text="a red circle", num_images=1, indice_name=odd).json()
            assert client.get(rows[0]["url"]).status_code == 200
    finally:
        both.state.service.close()


def test_stored_vectors_fall_back_to_the_rows(app, shapes, monkeypatch):
    """With an index that can't give exact vectors back (IVF-PQ, GPU), the rows are used."""
    from vqret.retrieval import collection as collection_module
    from vqret.retrieval.query import QueryError

    collection, _ = shapes
    served = app.state.service.stores["shapes"]
    from_index = served.stored_vectors([4, 0, 9])
    monkeypatch.setattr(collection_module, "_stores_exact_vectors", lambda index: False)
    from_rows = served.stored_vectors([4, 0, 9])
    ids, vectors = collection.store.vectors()
    expected = np.stack([vectors[list(ids).index(i)] for i in (4, 0, 9)])
    assert np.allclose(from_rows, expected) and np.allclose(from_index, expected, atol=1e-6)
    with pytest.raises(QueryError) as raised:
        served.stored_vectors([999999])
    assert raised.value.status == 404


def test_originals_browsers_cant_show_are_sent_as_jpeg(embedder, tmp_path):
    from fixtures.shapes import make_shape_folder
    from vqret import Collection

    folder = tmp_path / "mixed"
    drawn = make_shape_folder(folder, 4, seed=5, size=96)
    Image.open(drawn[0][0]).save(folder / "scan.tif")
    collection = Collection.create(folder, embedder=embedder)
    collection.index()
    (tiff_id,) = [h.id for h in collection.search(text="a red circle", k=5) if h.path == "scan.tif"]
    app = create_app([collection], warm=False)
    try:
        with TestClient(app) as client:
            r = client.get(f"/image/mixed/{tiff_id}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(r.content)).size == (96, 96)
            png = client.get("/image/mixed/0")
            assert png.headers["content-type"] == "image/png"
    finally:
        app.state.service.close()


def test_serve_cli_errors_are_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli("serve", "--store", str(tmp_path / "nothing"), "--port", "0", check=False)
    assert proc.returncode == 1 and "no vqret store" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cors_only_for_the_origins_given(shapes):
    collection, _ = shapes
    origin = {"Origin": "https://front.example"}
    with TestClient(create_app([collection], warm=False)) as client:
        r = client.get("/indices-list", headers=origin)
        assert "access-control-allow-origin" not in r.headers  # off by default
        client.app.state.service.close()
    opened = create_app([collection], cors_origins=["https://front.example"], warm=False)
    try:
        with TestClient(opened) as client:
            r = knn(client, text="a red circle", num_images=1)
            assert r.status_code == 200
            r = client.post("/knn-service", json={"text": "a red circle"}, headers=origin)
            assert r.headers["access-control-allow-origin"] == "https://front.example"
            other = client.get("/indices-list", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
    finally:
        opened.state.service.close()


def test_an_unexpected_error_is_a_json_500_without_a_trace(shapes, monkeypatch):
    collection, _ = shapes
    app = create_app([collection], warm=False)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            monkeypatch.setattr(
                app.state.service, "run", lambda *a, **k: 1 / 0, raising=True
            )
            r = client.post("/api/search", json={"text": "a red circle"})
            assert "internal error" in assert_json_error(r, 500)
            assert "ZeroDivision" not in r.text
    finally:
        app.state.service.close()


def test_serve_cli_store_names(tmp_path):
    from vqret.cli.serve import _parse_stores

    odd = tmp_path / "a=b"
    odd.mkdir()
    assert _parse_stores(None) is None
    assert _parse_stores(["photos/", "work=/data/w.vqret", str(odd)]) == [
        (None, "photos/"),
        ("work", "/data/w.vqret"),
        (None, str(odd)),  # an existing path with '=' in it stays a path
    ]


def test_terms_as_json_text_in_a_query_string_or_form(client):
    """GET and multipart can't carry a JSON list: `terms` may be its JSON text there."""
    terms = '[{"text": "a red circle"}, {"text": "a red star", "weight": -0.5}]'
    posted = client.post("/api/search", json={"terms": json.loads(terms), "k": 5}).json()
    by_get = client.get("/api/search", params={"terms": terms, "k": 5}).json()
    by_form = client.post("/api/search", data={"terms": terms, "k": "5"}).json()
    ids = [r["id"] for r in posted["results"]]
    assert ids == [r["id"] for r in by_get["results"]] == [r["id"] for r in by_form["results"]]
    assert posted["query"]["terms"][1] == {"type": "text", "weight": -0.5, "text": "a red star"}
    bad = client.get("/api/search", params={"terms": "[{"})
    assert "terms is not valid JSON" in assert_json_error(bad, 400)
