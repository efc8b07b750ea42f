"""`vqret serve`'s clip-retrieval API (/knn-service, /metadata, /indices-list), in process."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from functools import partial

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("multipart")

from serve_helpers import (  # noqa: E402
    DUPLICATE,
    assert_json_error,
    index_shapes,
    knn,
    path_of,
    png_bytes,
)
from starlette.testclient import TestClient  # noqa: E402
from vqret.retrieval.engine import unique_mask  # noqa: E402
from vqret.server.app import create_app  # noqa: E402

# ------------------------------------------------------------------------------------------
# clip-retrieval's API
# ------------------------------------------------------------------------------------------


def test_knn_service_text_has_clip_retrievals_shape(client, shapes):
    collection, _ = shapes
    r = knn(client, text="a red circle", modality="image", num_images=5, indice_name="shapes")
    assert r.status_code == 200, r.text
    rows = r.json()
    assert isinstance(rows, list) and len(rows) == 5
    for row in rows:
        assert list(row) == ["image_path", "url", "id", "similarity"]
        assert isinstance(row["id"], int) and isinstance(row["similarity"], float)
        assert row["image_path"] == path_of(collection, row["id"])
        assert row["url"] == f"http://testserver/image/shapes/{row['id']}"
    assert sum("red_circle" in row["image_path"] for row in rows) >= 4
    expected = collection.search(text="a red circle", k=5)
    assert [row["id"] for row in rows] == [h.id for h in expected]


def test_knn_service_inputs_and_limits(client, embedder, shapes):
    data = png_bytes("orange", "star")
    by_image = knn(client, image=base64.b64encode(data).decode(), modality="image",
                   num_images=4, indice_name="shapes").json()
    assert sum("orange_star" in row["image_path"] for row in by_image) >= 3
    vector = embedder.embed_texts(["a purple circle"])[0].tolist()
    by_vector = knn(client, embedding_input=vector, modality="image", num_images=4,
                    indice_name="shapes").json()
    by_text = knn(client, text="a purple circle", modality="image", num_images=4,
                  indice_name="shapes").json()
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]
    assert np.allclose([r["similarity"] for r in by_vector], [r["similarity"] for r in by_text])
    # num_result_ids bounds the knn; num_images the answer
    few = knn(client, text="a red circle", num_images=10, num_result_ids=3, indice_name="shapes")
    assert len(few.json()) == 3
    # clip-front sends every field, most of them null; one store: indice_name may be left out
    front = knn(client, text="a red circle", image=None, image_url=None, modality="image",
                num_images=2, indice_name=None, num_result_ids=None, use_mclip=False,
                deduplicate=False, use_safety_model=False)
    assert front.status_code == 200 and len(front.json()) == 2


def test_knn_service_deduplicate(client, shapes):
    collection, _ = shapes
    encoded = base64.b64encode((collection.store.root / DUPLICATE).read_bytes()).decode()
    plain = knn(client, image=encoded, num_images=3, indice_name="shapes").json()
    assert {r["image_path"] for r in plain[:2]} == {"00000_red_circle.png", DUPLICATE}
    deduped = knn(client, image=encoded, num_images=3, num_result_ids=30, deduplicate=True,
                  indice_name="shapes").json()
    assert len(deduped) == 3 and deduped[0]["id"] == plain[0]["id"]
    vectors = collection.store.vectors()
    by_id = dict(zip(vectors[0].tolist(), vectors[1], strict=True))
    kept = np.stack([by_id[r["id"]] for r in deduped])
    assert unique_mask(kept).all()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text": "a red circle", "modality": "text", "indice_name": "shapes"}, 400, "text rows"),
        ({"text": "a red circle", "indice_name": "nope"}, 404, "unknown store"),
        ({"text": "a red circle", "modality": "audio", "indice_name": "shapes"}, 400, "modality"),
        ({"indice_name": "shapes", "modality": "image"}, 400, "no query"),
        ({"text": "", "indice_name": "shapes"}, 400, "empty"),
        ({"text": "a", "image": "aGk=", "indice_name": "shapes"}, 400, "exactly one"),
        ({"text": "a", "num_images": -3, "indice_name": "shapes"}, 400, "num_images"),
        ({"embedding_input": [1, 2], "indice_name": "shapes"}, 400, "embedding_input"),
        ({"image_url": "http://127.0.0.1:9/q.png", "indice_name": "shapes"}, 403, "disabled"),
    ],
)
def test_knn_service_errors(client, body, status, words):
    assert words in assert_json_error(knn(client, **body), status)


def test_metadata_and_indices_list(client, shapes):
    collection, _ = shapes
    assert client.get("/indices-list").json() == ["shapes"]
    r = client.post("/metadata", content=json.dumps({"indice_name": "shapes", "ids": [5, 999, 2]}))
    assert r.json() == [
        {"id": 5, "metadata": {"image_path": path_of(collection, 5),
                               "url": "http://testserver/image/shapes/5"}},
        {"id": 2, "metadata": {"image_path": path_of(collection, 2),
                               "url": "http://testserver/image/shapes/2"}},
    ]
    assert_json_error(client.post("/metadata", json={"indice_name": "shapes", "ids": "5"}), 400)
    assert_json_error(client.post("/metadata", json={"indice_name": "x", "ids": [1]}), 404)
    assert_json_error(client.post("/metadata", json={"ids": ["a"]}), 400)


def test_image_url_only_when_allowed_and_capped(shapes, tmp_path):
    collection, _ = shapes
    (tmp_path / "q.png").write_bytes(png_bytes("blue", "circle"))
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"0" * 50_000)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    allowing = create_app([collection], allow_url_queries=True, url_max_bytes=20_000, warm=False)
    try:
        with TestClient(allowing) as client:
            rows = knn(client, image_url=f"{base}/q.png", num_images=4).json()
            assert sum("blue_circle" in r["image_path"] for r in rows) >= 3
            r = client.post("/api/search", json={"image_url": f"{base}/q.png", "k": 2})
            assert r.json()["query"]["type"] == "image_url"
            assert_json_error(knn(client, image_url=f"{base}/big.png"), 413)
            assert "404" in assert_json_error(knn(client, image_url=f"{base}/none.png"), 400)
            assert_json_error(knn(client, image_url="file:///etc/passwd"), 400)
            assert_json_error(knn(client, image_url="http://127.0.0.1:9/refused.png"), 400)
    finally:
        allowing.state.service.close()
        files.shutdown()



def test_text_modality_searches_text_rows_when_there_are_some(embedder, tmp_path):
    """Once a store has text rows (captions), modality "text" searches them."""
    collection, drawn = index_shapes(tmp_path / "captioned", embedder, n=24)
    if not hasattr(collection, "index_texts"):
        pytest.skip("this vqret has no text rows yet")
    captions = tmp_path / "captions.csv"
    lines = ["image,text"] + [f"{row[0].name},{row[1]}" for row in drawn]
    captions.write_text("\n".join(lines) + "\n")
    collection.index_texts(captions)
    app = create_app([collection], warm=False)
    try:
        with TestClient(app) as client:
            found = knn(client, text="a red circle", modality="text", num_images=3).json()
    finally:
        app.state.service.close()
    assert [list(r) for r in found] == [["caption", "image_path", "url", "id", "similarity"]] * 3
    assert found[0]["caption"] == "a red circle"
    assert "red_circle" in found[0]["image_path"]
    assert found[0]["url"].startswith("http://testserver/image/captioned/")


