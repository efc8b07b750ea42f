"""Generate-on-miss over HTTP: the picture's record and URL, drawing that never holds up a
search, and a full queue answered 503 with Retry-After (on a live server, no timing)."""

from __future__ import annotations

import shutil
import threading

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from conftest import TESTS  # noqa: E402
from serve_helpers import index_shapes, live_server  # noqa: E402
from vqret.diffusion import fallback  # noqa: E402
from vqret.server.app import create_app  # noqa: E402
from vqret.server.served_store import GENERATION_MAX_WAITING  # noqa: E402

FIXTURE = TESTS / "fixtures" / "tiny_dit"
HANG_GUARD_S = 300  # only stops a broken run from hanging; nothing here waits on the clock


@pytest.fixture(scope="module")
def drawing_store(tmp_path_factory, embedder):
    collection, _ = index_shapes(tmp_path_factory.mktemp("gen") / "shapes", embedder, n=24)
    for part in ("tokenizer", "diffusion"):
        shutil.copytree(FIXTURE / part, collection.store.path / part)
    return collection


def test_generated_carries_the_picture_and_its_facts(drawing_store):
    app = create_app([drawing_store], device="cpu", warm=False)
    try:
        with live_server(app) as url, httpx.Client(base_url=url, timeout=HANG_GUARD_S) as http:
            body = http.post("api/search", json={"q": "a red circle", "generate": "always",
                                                 "seed": 2, "k": 3}).json()
            generated = body["generated"]
            for key in ("url", "prompt", "seed", "clip_score", "best_score", "threshold",
                        "codes", "codes_shape", "mode"):
                assert key in generated, key
            assert "path" not in generated  # the server's disk is nobody's business
            assert generated["prompt"] == "a red circle" and generated["seed"] == 2
            assert generated["best_score"] == body["results"][0]["score"]
            side = generated["codes_shape"]
            assert len(generated["codes"]) == side[0] * side[1]
            png = http.get(generated["url"].lstrip("/"))
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            # only names in the store's generated folder are served
            for name in ("..%2Fmanifest.json", "nothing.png", "x.txt"):
                r = http.get(f"generated/shapes/{name}")
                assert r.status_code == 404 and "error" in r.json()
            # a matching query under auto draws nothing, and says why
            body = http.post("api/search", json={"q": "a red circle", "threshold": 0.0}).json()
            assert body["generated"] is None and "no image generated" in body["note"]
    finally:
        app.state.service.close()


def test_drawing_never_holds_up_searches_and_a_full_queue_is_503(drawing_store, monkeypatch):
    release = threading.Event()
    drawing = threading.Semaphore(0)
    drawn = []

    def slow_draw(collection, query, vector):  # stands in for the DiT: waits to be let go
        drawing.release()
        assert release.wait(HANG_GUARD_S)
        drawn.append(query.prompt)
        return {"path": str(collection.store.path / "diffusion" / "generated" / "x.png"),
                "prompt": query.prompt, "seed": query.seed, "clip_score": 0.5}

    monkeypatch.setattr(fallback, "_draw", slow_draw)
    app = create_app([drawing_store], device="cpu", warm=False)
    served = app.state.service.stores["shapes"]
    capacity = GENERATION_MAX_WAITING + 1  # the one drawing, and the ones queued behind it
    answers: list[httpx.Response] = []
    try:
        with live_server(app) as url:
            def ask(text: str) -> None:
                with httpx.Client(base_url=url, timeout=HANG_GUARD_S) as own:
                    answers.append(own.post("api/search", json={"q": text,
                                                                "generate": "always"}))

            waiting = [threading.Thread(target=ask, args=(f"a red circle + a {n} star",))
                       for n in ("blue", "green", "purple")[:capacity]]
            for thread in waiting:
                thread.start()
            assert drawing.acquire(timeout=HANG_GUARD_S)  # the first one is drawing
            while served.generation._slots._value > 0:  # the others have queued
                threading.Event().wait(0.01)
            with httpx.Client(base_url=url, timeout=HANG_GUARD_S) as http:
                # searches go on while the generator is busy
                for text in ("a red circle", "a blue square"):
                    r = http.post("api/search", json={"q": text, "generate": "never", "k": 3})
                    assert r.status_code == 200 and len(r.json()["results"]) == 3
                # one drawing more is refused at once, with when to come back
                busy = http.post("api/search", json={"q": "a yellow star", "generate": "always"})
                assert busy.status_code == 503
                assert busy.headers["retry-after"] == "10"
                assert "busy" in busy.json()["error"] and busy.json()["status"] == 503
                assert not drawn, "nothing was drawn yet: the refusal did not wait"
            release.set()
            for thread in waiting:
                thread.join(HANG_GUARD_S)
    finally:
        release.set()
        app.state.service.close()
    assert [r.status_code for r in answers] == [200] * capacity
    assert sorted(drawn) == sorted(r.json()["generated"]["prompt"] for r in answers)
    assert all(r.json()["generated"]["url"].endswith("/x.png") for r in answers)
