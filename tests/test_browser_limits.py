"""In headless Chromium, the upload limits as a person meets them: a file over --max-upload-mb and more images than
--max-images each end in a toast saying so, and the dataset keeps what it had. Screenshots go to ``screenshots/``."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.browser_helpers import CHROMIUM, SHOTS, launch_chromium, open_page, serve, shot, wait_loaded

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


def test_upload_limits_show_a_toast_and_keep_the_dataset(tmp_path):
    from app.service import Limits, Service

    service = Service(tmp_path / "outputs", limits=Limits(max_upload_mb=0.05, max_images=3))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 90, 200)).save(src / f"small_{i}.png")
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 80).convert("RGB").save(buf, "PNG")      # ~190 kB: over 0.05 MB
    (src / "big.png").write_bytes(buf.getvalue())
    service.add_files("limits", [src / "small_0.png"])
    url, demo = serve(service)
    SHOTS.mkdir(exist_ok=True)
    try:
        with playwright_api.sync_playwright() as p:
            browser = launch_chromium(p)
            page = open_page(browser, url)
            assert page.input_value("#run-name input") == "limits"

            page.set_input_files("#dataset-upload input[type=file]", [str(src / "big.png")])
            toast = page.locator(".toast-body").filter(has_text="big.png")      # Gradio checks max_file_size
            toast.first.wait_for()
            shot(page, "limits-size-toast")
            assert "exceed the maximum allowed size of 51.2 Kb" in toast.first.inner_text()

            page.reload()
            wait_loaded(page)
            page.set_input_files("#dataset-upload input[type=file]", [str(src / f"small_{i}.png") for i in (1, 2, 3)])
            toast = page.locator(".toast-body").filter(has_text="limit of 3 images")
            toast.first.wait_for()
            shot(page, "limits-count-toast")
            assert "--max-images" in toast.first.inner_text()
            browser.close()
    finally:
        demo.close()
    assert [name for name, _, _ in service.dataset_items("limits")] == ["small_0.png"]
