"""The server's limits: the k cap (clamped for clip-retrieval's clients), the decode budget
(503 + Retry-After), query images decoded at reduced size, and peak memory under 50
concurrent uploads of a 49 MP PNG on a real `vqret serve` process (no timing asserted)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from serve_helpers import assert_json_error, index_shapes, knn, path_of, png_bytes  # noqa: E402
from vqret.benchmarks import serve_load  # noqa: E402
from vqret.retrieval.images import load_image  # noqa: E402
from vqret.server.decode_budget import PixelBudget, default_budget_mp  # noqa: E402
from vqret.server.inputs import RequestError  # noqa: E402

# the benchmark's own load: a 7000 x 7000 1-bit PNG (49 MP, under the 50 MP cap) of a few KB
BIG_SIDE = serve_load.BIG_SIDE
big_bilevel_png = serve_load.bilevel_png


# ---- the k cap -----------------------------------------------------------------------------


def test_clip_fronts_3000_result_ids_are_clamped_and_healthz_says_the_cap(client, shapes):
    collection, _ = shapes
    assert client.get("/healthz").json()["max_k"] == 1000
    # clip-front's request, as it sends it: 40 images out of 3000 result ids
    rows = knn(client, text="a red circle", modality="image", num_images=40,
               num_result_ids=3000, indice_name="shapes", deduplicate=True).json()
    assert isinstance(rows, list) and rows
    assert "red_circle" in rows[0]["image_path"]
    # num_images over the cap is clamped too: every image of the store, not a 400
    everything = knn(client, text="a red circle", num_images=5000, num_result_ids=5000).json()
    assert len(everything) == len(collection.store)
    # our own API's k keeps refusing what it can't give
    message = assert_json_error(client.post("/api/search", json={"text": "a", "k": 1001}), 400)
    assert "1..1000" in message


def test_max_k_is_set_at_start_up(shapes):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    app = create_app([shapes[0]], max_k=7, warm=False)
    try:
        with TestClient(app) as small:
            assert small.get("/healthz").json()["max_k"] == 7
            rows = knn(small, text="a red circle", num_images=40, num_result_ids=3000).json()
            assert len(rows) == 7
            assert_json_error(small.post("/api/search", json={"text": "a", "k": 8}), 400)
    finally:
        app.state.service.close()


def test_a_url_of_one_of_its_own_images_is_searched_by_its_stored_vector(client, shapes):
    """clip-front's "similar" sends the result's url back as image_url: no fetch needed."""
    collection, _ = shapes
    first = knn(client, text="a blue square", num_images=3).json()[0]
    assert first["url"].startswith("http://testserver/image/shapes/")
    similar = knn(client, image_url=first["url"], num_images=5, indice_name="shapes").json()
    assert similar[0]["id"] == first["id"] and similar[0]["similarity"] > 0.999
    assert sum("blue_square" in path_of(collection, r["id"]) for r in similar) >= 4
    # an id the store doesn't have is a 404; a URL elsewhere is still refused (no fetching)
    missing = first["url"].rsplit("/", 1)[0] + "/999999"
    assert_json_error(knn(client, image_url=missing), 404)
    assert_json_error(knn(client, image_url="http://example.com/image/shapes/1"), 403)


# ---- the decode budget ---------------------------------------------------------------------


def test_pixel_budget_waits_then_refuses_with_retry_after():
    mp = 1_000_000
    budget = PixelBudget(100 * mp, wait_s=0.0)
    with budget.hold(60 * mp, deadline=time.monotonic()):
        with budget.hold(40 * mp, deadline=time.monotonic()):  # fits exactly
            assert budget.stats()["in_flight_mp"] == 100
        with pytest.raises(RequestError) as refused:
            with budget.hold(40 * mp + 1, deadline=time.monotonic()):
                pass
    assert refused.value.status == 503 and refused.value.headers["Retry-After"].isdigit()
    assert budget.stats()["refused"] == 1 and budget.stats()["peak_mp"] == 100
    # an image larger than the whole budget waits for it to be free, then decodes alone
    with budget.hold(10**12, deadline=time.monotonic()):
        assert budget.stats()["in_flight_mp"] == 100
    assert budget.stats()["in_flight_mp"] == 0

    # a waiter is let in as soon as the pixels are given back (an event, not a sleep)
    budget = PixelBudget(100, wait_s=60)
    holding, got_in = threading.Event(), threading.Event()

    def second():
        holding.wait()
        with budget.hold(100, deadline=time.monotonic() + 60):
            got_in.set()

    thread = threading.Thread(target=second)
    thread.start()
    with budget.hold(100, deadline=time.monotonic()):
        holding.set()
        assert not got_in.wait(0.2)  # it can't get in while the budget is taken
    assert got_in.wait(60)
    thread.join()
    assert 50 <= default_budget_mp() <= 250


def test_an_upload_over_the_budget_is_503_with_retry_after(shapes):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    app = create_app([shapes[0]], decode_budget_mp=1, decode_wait_s=0, warm=False)
    budget = app.state.service.decode_budget
    image = png_bytes("red", "circle")
    try:
        with TestClient(app) as limited:
            with budget.hold(budget.total, deadline=time.monotonic()):  # all of it is taken
                busy = limited.post("/api/search", files={"image": ("q.png", image)})
                assert_json_error(busy, 503)
                assert busy.headers["retry-after"].isdigit()
                clip = knn(limited, image=base64.b64encode(image).decode(), num_images=3)
                assert_json_error(clip, 503)
                # text needs no decoding: unaffected
                assert limited.post("/api/search", json={"text": "a red circle"}).is_success
            ok = limited.post("/api/search", files={"image": ("q.png", image)})
            assert ok.status_code == 200 and ok.json()["results"]
            stats = limited.get("/healthz").json()["decode"]
            assert stats["refused"] == 2 and stats["budget_mp"] == 1 and stats["in_flight_mp"] == 0
    finally:
        app.state.service.close()


def test_query_images_decode_at_reduced_size_under_the_gate():
    data = big_bilevel_png()
    seen: list[int] = []

    class Gate:
        def __init__(self, pixels):
            seen.append(pixels)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append(-1)

    image = load_image(data, max_pixels=50_000_000, draft_size=(224, 224),
                       reduce_size=(448, 448), gate=Gate)
    assert seen == [BIG_SIDE * BIG_SIDE, -1]  # entered with the decoded pixels, then left
    assert image.mode == "RGB" and 448 <= min(image.size) < 2 * 448
    # averaged, not sampled: the circle's edge is grey, the inside black, the outside white
    assert image.getpixel((image.width // 2, image.height // 2)) == (0, 0, 0)
    assert image.getpixel((2, 2)) == (255, 255, 255)
    # a JPEG is drafted first: the gate is charged its reduced pixels only
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(buffer, "JPEG")
    seen.clear()
    photo = load_image(buffer.getvalue(), draft_size=(224, 224), reduce_size=(448, 448),
                       gate=Gate)
    assert seen[0] == 500 * 375 and min(photo.size) >= 224


# ---- peak memory of a real server under 50 concurrent big uploads ---------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_fifty_concurrent_49_mp_uploads_keep_memory_bounded(embedder, tmp_path):
    collection, _ = index_shapes(tmp_path / "shapes", embedder, n=24)
    # the default budget (sized from RAM) and wait: what a user gets
    cmd = [sys.executable, "-m", "vqret.cli.main", "serve", "--store",
           str(collection.store.path), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/"
        match = re.search(r"(http://\S+/)", line)
        assert match, line + proc.stderr.read()
        url = match.group(1)
        data = big_bilevel_png()
        with httpx.Client(base_url=url, timeout=300) as warm:
            # one small image first, so the idle baseline has the image path warmed up
            assert warm.post("api/search", files={"image": ("s.png", png_bytes("red", "circle"))}
                             ).status_code == 200
        idle = serve_load.rss(proc.pid)
        # peak RSS := current RSS, so VmHWM is this load's peak; where that can't be done,
        # VmHWM also covers start-up: only a stricter check
        serve_load.reset_peak(proc.pid)

        def upload(i: int) -> int:
            with httpx.Client(base_url=url, timeout=300) as http:
                r = http.post("api/search", files={"image": (f"big{i}.png", data)},
                              data={"k": "5"})
                if r.status_code == 503:
                    assert r.headers["retry-after"].isdigit()
                return r.status_code

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(upload, range(50)))
        peak = serve_load.peak_rss(proc.pid)
        with httpx.Client(base_url=url, timeout=60) as http:
            health = http.get("healthz").json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    assert health["decode"]["refused"] == statuses.count(503)
    assert health["decode"]["peak_mp"] <= health["decode"]["budget_mp"]
    growth = peak - idle
    assert growth < 1.5 * (1 << 30), f"peak RSS grew {growth / (1 << 20):.0f} MiB over idle"
