"""clip-retrieval's own web front end (clip-front), unchanged, against a vqret server.

clip-front's build ships in the clip-retrieval wheel (`front/build`, installed with
`--no-deps` by the test extra's CI step). It is served as it is from a static server on
loopback, on another port than the API, so its calls are cross-origin like a hosted
clip-front's (the server is started with cors_origins, i.e. `vqret serve --cors-origin`);
only config.json is answered the way `clip-retrieval front --default_backend` does. Debian's
headless Chromium drives it through Playwright, as in test_web_browser.py.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium", allow_module_level=True)

from serve_helpers import index_shapes, live_server, path_of  # noqa: E402
from vqret.server.app import create_app  # noqa: E402


def front_build() -> Path:
    """clip-front's build, where the clip-retrieval wheel installs it (site-packages/front)."""
    try:
        dist = metadata.distribution("clip-retrieval")
    except metadata.PackageNotFoundError:
        pytest.fail("clip-retrieval is missing: pip install --no-deps clip-retrieval "
                    "(the test extra's note; .ci/run does it)")
    build = Path(dist.locate_file("front/build"))
    assert (build / "index.html").is_file(), f"no clip-front build in {build}"
    return build


class _Front(http.server.SimpleHTTPRequestHandler):
    config: bytes = b"{}"

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.split("?")[0] == "/config.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            self.wfile.write(self.config)
            return
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def front_and_back(tmp_path_factory, embedder):
    """(clip-front's page URL, pointed at the API; collection)."""
    collection, _ = index_shapes(tmp_path_factory.mktemp("clip-front") / "shapes", embedder)
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), None)
    front_origin = f"http://127.0.0.1:{static.server_address[1]}"
    app = create_app([collection], cors_origins=[front_origin])
    with live_server(app) as api:
        back = api.rstrip("/")
        handler = type("Front", (_Front,), {"config": json.dumps(
            {"defaultBackend": back, "defaultIndex": "shapes", "urlColumn": "url"}).encode()})
        static.RequestHandlerClass = functools.partial(handler, directory=str(front_build()))
        thread = threading.Thread(target=static.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"{front_origin}/?back={quote(back, safe='')}&index=shapes", collection
        finally:
            static.shutdown()
            static.server_close()
    app.state.service.close()


def shown_ids(page) -> list[int]:
    """The ids of the pictures clip-front shows, in order (from their /image/shapes/ID src)."""
    srcs = page.eval_on_selector_all("clip-front >> img.pic", "imgs => imgs.map(i => i.src)")
    return [int(src.rsplit("/", 1)[1]) for src in srcs]


def wait_for_pictures(page, not_first: int | None = None) -> list[int]:
    """Wait until clip-front shows loaded pictures (a new first one, if `not_first` given)."""
    page.wait_for_function(
        """(old) => {
            const root = document.querySelector('clip-front').shadowRoot;
            const imgs = [...root.querySelectorAll('img.pic')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)
                && (old === null || !imgs[0].src.endsWith('/' + old));
        }""",
        arg=not_first,
    )
    return shown_ids(page)


def test_clip_front_unchanged_searches_by_text_upload_and_similar(front_and_back, tmp_path):
    url, collection = front_and_back
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))  # e.g. images.filter is not...
        calls: list[dict] = []
        page.on("request", lambda r: r.url.endswith("/knn-service")
                and calls.append(json.loads(r.post_data or "{}")))
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("clip-front >> #searchBar")
        # the index list came from /indices-list, cross-origin
        page.wait_for_function("() => document.querySelector('clip-front').indices.length > 0")

        # a text query, typed and entered as a user does
        page.fill("clip-front >> #searchBar", "a red circle")
        page.press("clip-front >> #searchBar", "Enter")
        ids = wait_for_pictures(page)
        assert calls[-1]["num_result_ids"] == 3000  # what clip-front always asks for
        assert "red_circle" in path_of(collection, ids[0]), [path_of(collection, i) for i in ids]

        # an image upload through its file chooser
        blue = next(collection.store.root.glob("*_blue_square.png"))
        page.set_input_files("clip-front >> #filechooser", str(blue))
        ids = wait_for_pictures(page, not_first=ids[0])
        assert calls[-1]["image"] and not calls[-1]["text"]  # it sends text ""
        assert path_of(collection, ids[0]) == blue.name

        # "similar" on a result: clip-front sends that result's url back as image_url
        page.fill("clip-front >> #searchBar", "a green star")
        page.press("clip-front >> #searchBar", "Enter")
        ids = wait_for_pictures(page, not_first=ids[0])
        pick = next(i for i in ids if "green_star" in path_of(collection, i))
        figure = page.locator("clip-front >> figure").nth(ids.index(pick))
        figure.hover()
        figure.locator(".subImageSearch").click()
        page.wait_for_function(
            "() => document.querySelector('clip-front').lastSearch === 'imageUrl'")
        similar = wait_for_pictures(page)
        assert calls[-1]["image_url"].endswith(f"/image/shapes/{pick}")
        assert similar[0] == pick  # the image itself first, as clip-retrieval answers
        # (clip-front asks for deduplication: the other green stars are within 0.94 of it)
        assert not errors, errors
        browser.close()
