"""The search page in a real headless browser: Debian's chromium, driven by playwright (no browser is
downloaded), against the served process (tests/conftest.py `served`). A Spanish query lists the
expected clip, its player loads the clip's audio from the service, and the page is captured.

`make test` installs chromium where it can (Makefile target `browser`); without it the test skips and
says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: What the machine's closed network needs: no background connections, no sandbox as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs it as root: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_a_spanish_query_lists_the_clip_and_its_player_loads(browser, served, packaged, tmp_path):
    clip = next(c for c in packaged.clips if c.clip_id == "household-toilet")
    query = clip.captions["es"][0]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(served.url + "/")
    assert page.title() == "CACARA audio search"
    page.fill("#query", query)
    page.click("button[type=submit]")
    page.wait_for_selector("#results li", timeout=60_000)
    ids = page.eval_on_selector_all("#results li", "items => items.map(i => i.dataset.clipId)")
    assert clip.clip_id in ids[:5], ids
    item = page.locator(f'#results li[data-clip-id="{clip.clip_id}"]')
    player = item.locator("audio")
    # The player fetches the clip from the service when asked to (a user pressing play) and reads its
    # length (the page sets data-duration on loadedmetadata).
    player.evaluate("el => { el.preload = 'metadata'; el.load(); }")
    page.wait_for_function("el => el.dataset.duration || el.dataset.error", arg=player.element_handle(), timeout=30_000)
    assert player.get_attribute("data-error") is None
    assert float(player.get_attribute("data-duration")) == pytest.approx(clip.duration_s, abs=0.1)
    assert "score" in item.inner_text()
    assert page.url.endswith("?q=" + page.evaluate("q => encodeURIComponent(q)", query))
    shot = tmp_path / "search_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert not errors, errors


def test_the_page_shows_the_services_refusal(browser, served):
    page = browser.new_page()
    page.goto(served.url + "/?q=" + "a" * 600)  # longer than serve.max_text_chars
    page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
    assert page.locator("#results li").count() == 0
    assert page.inner_text("#status").strip()
