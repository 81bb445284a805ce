"""In headless Chromium: a run trained in this process (quick preset, a few steps, the zkw example) shows its effect
check in the Train tab (verdict card and grid) and in the run picker, and the Preview tab runs the check for the
adapter on demand. Screenshots go to ``screenshots/`` (git-ignored).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser_helpers import (CHROMIUM, SHOTS, choose, launch_chromium, open_page, serve, shot, tab,
                                   train_in_thread)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
ZKW = Path(__file__).resolve().parent.parent / "examples" / "zkw"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app.service import Service
    from trainer.config import PRESETS_DIR

    tmp = tmp_path_factory.mktemp("browser-effect")
    shutil.copytree(PRESETS_DIR, tmp / "presets")
    service = Service(tmp / "outputs", presets_dir=tmp / "presets", train_fn=train_in_thread)
    service.add_files("eff", sorted(ZKW.iterdir()))
    service.start_training("eff", {**service.preset_form("quick"), "max_train_steps": 4, "trigger_word": "zkw"})
    snap = service.jobs.wait(600)
    assert snap.state == "finished", snap.error
    assert dict(snap.effect)["verdict"] in ("strong", "weak", "none", "overbaked")
    url, demo = serve(service)
    yield url, service
    demo.close()


def test_train_tab_shows_the_verdict_and_grid_and_preview_checks_on_demand(app):
    url, service = app
    verdict = service.run_effect("eff")["verdict"]
    SHOTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_page(browser, url)
        tab(page, "2. Train")
        card = page.locator("#train-effect .effect-card")
        card.wait_for()
        assert card.get_attribute("data-verdict") == verdict
        assert f"effect: {verdict} (" in card.inner_text()
        page.locator("#train-effect-grid").scroll_into_view_if_needed()    # the image loads lazily
        page.locator("#train-effect-grid img").wait_for()
        assert f"effect: {verdict}" in service.run_state("eff")
        page.locator("#train-effect").scroll_into_view_if_needed()
        shot(page, "effect-1-train-tab")

        tab(page, "3. Preview")
        choose(page, "preview-adapter", "eff/lora.safetensors")
        page.click("#preview-effect-box .label-wrap")       # open the accordion
        page.click("#preview-effect-btn")
        got = page.locator("#preview-effect .effect-card")
        got.wait_for(timeout=300_000)
        assert got.get_attribute("data-verdict") == verdict
        page.locator("#preview-effect-grid").scroll_into_view_if_needed()
        page.locator("#preview-effect-grid img").wait_for()
        page.locator("#preview-effect").scroll_into_view_if_needed()
        shot(page, "effect-2-preview-tab")
        browser.close()
