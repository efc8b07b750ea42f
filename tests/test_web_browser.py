"""The search page in a real browser: Debian's headless Chromium driven by Playwright.

Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it) and the playwright
Python package; Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium", allow_module_level=True)

from serve_helpers import index_shapes, live_server  # noqa: E402
from vqret.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory, embedder):
    """(base URL, collection) of a live server on 127.0.0.1 over the drawn shapes."""
    collection, _ = index_shapes(tmp_path_factory.mktemp("web") / "shapes", embedder)
    app = create_app([collection])
    with live_server(app) as url:
        yield url, collection
    app.state.service.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


def open_page(browser, url: str, timeout_ms: int):
    """(page at `url`, the list its console errors and uncaught exceptions land in)."""
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(timeout_ms)
    page.goto(url)
    return page, problems


def card_ids(page) -> list[int]:
    return page.eval_on_selector_all("#grid .card", "cards => cards.map(c => +c.dataset.id)")


def paths_of(collection, ids: list[int]) -> list[str]:
    rows = collection.store.rows_by_id(ids, ["id", "path"])
    return [rows[i]["path"] for i in ids]


def wait_for_thumbnails(page, n: int = 8) -> None:
    page.wait_for_function(
        f"""() => {{
            const imgs = [...document.querySelectorAll('#grid .card img')].slice(0, {n});
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }}"""
    )


def test_search_page_end_to_end(site, browser, tmp_path):
    url, collection = site
    page, problems = open_page(browser, url, timeout_ms=15_000)

    # Type a query: the grid fills with red circles, each with its score.
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_selector("#grid .card")
    ids = card_ids(page)
    assert len(ids) == 20
    top = paths_of(collection, ids[:5])
    assert "red_circle" in top[0] and sum("red_circle" in p for p in top) >= 4, top
    assert "results for" in page.inner_text("#status")
    score = page.inner_text("#grid .card .score")
    assert 0 < float(score) <= 1
    wait_for_thumbnails(page)
    assert page.evaluate("location.search") == "?q=a+red+circle"
    shot = tmp_path / "search.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("VQRET_SCREENSHOTS"):  # keep it for a person to look at
        shutil.copy(shot, Path(os.environ["VQRET_SCREENSHOTS"]) / "search.png")

    # A click opens the full image.
    page.click("#grid .card .thumb")
    page.wait_for_function(
        "() => document.getElementById('viewer').open && "
        "document.getElementById('full').naturalWidth > 0"
    )
    assert page.get_attribute("#full", "src") == f"/image/shapes/{ids[0]}"
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('viewer').open")

    # "More like this" on the second result: that image itself is not among the answers.
    second = ids[1]
    page.click("#grid .card:nth-child(2) .like")
    page.wait_for_function(f"() => !document.querySelector('#grid .card[data-id=\"{second}\"]')")
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length === 20")
    similar = paths_of(collection, card_ids(page)[:4])
    assert sum("red_circle" in p for p in similar) >= 3, similar

    # Pick an image file to search by example.
    blue = next(collection.store.root.glob("*_blue_square.png"))
    page.set_input_files("#file", str(blue))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('like')")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('results')"
    )
    by_example = paths_of(collection, card_ids(page)[:4])
    assert by_example[0] == blue.name and sum("blue_square" in p for p in by_example) >= 3

    # Drop an image on the page (a File built in the page from a thumbnail it can fetch).
    star_id = next(
        r.id for r in collection.search(text="a green star", k=1)
    )
    page.evaluate(
        """async (src) => {
            const blob = await (await fetch(src)).blob();
            const data = new DataTransfer();
            data.items.add(new File([blob], 'dropped.jpg', { type: 'image/jpeg' }));
            document.dispatchEvent(new DragEvent('drop', { dataTransfer: data }));
        }""",
        f"/thumb/shapes/{star_id}",
    )
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('dropped.jpg')"
        " && document.getElementById('status').textContent.includes('results')"
    )
    dropped = paths_of(collection, card_ids(page)[:4])
    assert sum("green_star" in p for p in dropped) >= 3, dropped

    # An error is shown, not swallowed.
    page.fill("#q", "   ")
    page.press("#q", "Enter")
    assert "Type something" in page.inner_text("#status")
    assert not problems, problems
    page.close()


FAR_QUERY = "a photograph of a crowded city street at night"  # nothing like the drawings


@pytest.fixture(scope="module")
def drawing_site(tmp_path_factory, embedder):
    """A live server over drawn shapes whose store has the fixture tokenizer and DiT."""
    from conftest import TESTS

    collection, _ = index_shapes(tmp_path_factory.mktemp("web-dit") / "shapes", embedder)
    for part in ("tokenizer", "diffusion"):
        shutil.copytree(TESTS / "fixtures" / "tiny_dit" / part, collection.store.path / part)
    app = create_app([collection])
    with live_server(app) as url:
        yield url, collection
    app.state.service.close()


def test_the_page_reads_query_syntax_and_shows_a_generated_card(drawing_site, browser):
    url, collection = drawing_site
    page, problems = open_page(browser, url, timeout_ms=60_000)

    # Arithmetic: the page sends the syntax as it is and says how the server read it.
    page.fill("#q", "a red circle - 0.5:a red star")
    page.press("#q", "Enter")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('results')"
    )
    status = page.inner_text("#status")
    assert "read as “a red circle” − “a red star” × 0.5" in status, status
    top = paths_of(collection, card_ids(page)[:3])
    assert all("red_circle" in p for p in top), top
    assert not page.query_selector("#grid .card.generated")

    # A query nothing matches: the server draws one, shown first and marked "generated".
    page.fill("#q", FAR_QUERY)
    page.press("#q", "Enter")
    page.wait_for_selector("#grid .card.generated")
    first = page.query_selector("#grid .card")
    assert "generated" in (first.get_attribute("class") or "")
    assert first.inner_text().lower().count("generated") >= 1
    src = first.query_selector("img").get_attribute("src")
    assert src.startswith("/generated/shapes/") and src.endswith(".png")
    # the picture itself loads (a served PNG, not a broken image)
    page.wait_for_function(
        "() => document.querySelector('#grid .card.generated img').naturalWidth > 0"
    )
    assert "one was drawn" in page.inner_text("#status")
    assert len(card_ids(page)) == 21  # the 20 results, and the picture before them
    assert not problems, problems
    page.close()


def test_the_filter_bar_restricts_the_search(site, browser):
    url, collection = site
    page, problems = open_page(browser, url, timeout_ms=15_000)
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length === 20")
    # a glob on the path: only stars, though the query asks for circles
    page.fill("#f-in", "*star*")
    page.press("#f-in", "Enter")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('filtered')")
    shown = paths_of(collection, card_ids(page))
    assert shown and all("star" in p for p in shown), shown
    assert "in=*star*" in page.evaluate("decodeURIComponent(location.search)")
    # nothing passes: no cards, and the note says why
    page.fill("#f-type", "gif")
    page.press("#f-type", "Enter")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('no image passes')")
    assert card_ids(page) == []
    page.click("#f-clear")
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length === 20")
    # each card says when its picture was taken (no EXIF in drawings: the file's date)
    facts = page.inner_text("#grid .card .facts")
    import re

    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", facts), facts
    assert not problems, problems
    page.close()
