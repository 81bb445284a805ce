"""In headless Chromium, the file tools on one adapter (trained in this process for 2 steps): a blend compacted to
rank 2 shows its fit report; the Export tab shows what the file holds, converts it to PEFT and bakes it into the
built-in model. Screenshots go to ``screenshots/`` (git-ignored).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.service_helpers import make_dataset
from tests.browser_helpers import (CHROMIUM, SHOTS, choose, fill, launch_chromium, open_page, serve, shot, tab,
                                   train_in_thread)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app.service import Service
    from trainer.config import PRESETS_DIR

    tmp = tmp_path_factory.mktemp("browser-files")
    shutil.copytree(PRESETS_DIR, tmp / "presets")
    service = Service(tmp / "outputs", presets_dir=tmp / "presets", train_fn=train_in_thread)
    service.add_files("real", sorted(make_dataset(tmp / "src", n=4, size=64).iterdir()))
    service.start_training("real", {**service.preset_form("quick"), "max_train_steps": 2, "batch_size": 1})
    snap = service.jobs.wait(300)
    assert snap.state == "finished", snap.error
    url, demo = serve(service)
    yield url, service
    demo.close()


def test_compact_blend_then_inspect_convert_and_bake(app):
    url, service = app
    SHOTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_page(browser, url)

        tab(page, "4. Blend")
        choose(page, "blend-adapter-0", "real/lora.safetensors")
        choose(page, "blend-adapter-1", "real/lora.safetensors")
        fill(page, "blend-name", "small")
        fill(page, "blend-rank", 2)
        page.click("#blend-save")
        page.wait_for_selector("#blend-notice >> text=Saved the blend")
        report = page.input_value("#blend-fit textarea")
        assert "relative error overall" in report and " -> 2, error " in report
        assert (service.outputs / "_blends" / "small.safetensors").is_file()
        shot(page, "files-1-blend-compact")

        tab(page, "5. Export")
        choose(page, "export-adapter", "real/lora.safetensors")
        page.wait_for_function("document.querySelector('#export-inspect textarea')?.value.includes('format: kohya')")
        page.click("#export-convert .label-wrap")        # open the accordion
        page.click("#convert-btn")
        page.wait_for_selector("#convert-notice >> text=peft layout")
        assert (service.outputs / "real" / "lora-peft.safetensors").is_file()
        page.click("#export-bake .label-wrap")
        page.click("#bake-btn")
        page.wait_for_selector("#bake-notice >> text=Baked the adapter", timeout=120_000)
        assert Path(service.outputs / "_baked" / "real-lora-x1.safetensors").is_file()
        shot(page, "files-2-export-tools")
        browser.close()
