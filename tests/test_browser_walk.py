"""A new user's walk in headless Chromium, checking what used to surprise: files an upload did not add stay listed
with the reason; the report follows every dataset change; an unreadable image is marked on its card and removed in
one click; Start refuses a dataset the report knows is bad (and links to the Dataset tab); the trigger word and the
chosen run survive a reload (``?run=NAME`` and local storage) while another run trains; auto-captioning fills the
editor; the export is one Download button. Screenshots go to ``screenshots/`` (git-ignored). Tests run in order.
"""
from __future__ import annotations

import io
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.browser_helpers import (  # noqa: F401 - screenshot_on_failure is an autouse fixture
    CHROMIUM, SHOTS, choose, fill, launch_chromium, screenshot_on_failure, serve, set_run, shot, tab, wait_loaded)
from tests.service_helpers import make_dataset

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

STEP_SECONDS = 0.3


def _paced_train(config, listeners, control):
    """The real trainer, each step held a little so the other run is still training while the page is checked."""
    from trainer.events import Progress
    from trainer.loop.train import train

    def pace(event):
        if isinstance(event, Progress):
            time.sleep(STEP_SECONDS)
    return train(config, listeners=[*listeners, pace], control=control)


def _truncated_png(path):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png, "PNG")
    path.write_bytes(png.getvalue()[:70])
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app.service import Service
    from trainer.config import PRESETS_DIR

    tmp = tmp_path_factory.mktemp("walk")
    shutil.copytree(PRESETS_DIR, tmp / "presets")
    service = Service(tmp / "outputs", presets_dir=tmp / "presets", train_fn=_paced_train)
    threading.Thread(target=service.warm_up, daemon=True).start()
    url, demo = serve(service)
    src = make_dataset(tmp / "src", n=6, size=64)
    (src / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    _truncated_png(src / "broken.png")
    yield SimpleNamespace(url=url, service=service, src=src, tmp=tmp)
    service.jobs.stop()
    service.jobs.wait(120)
    demo.close()


@pytest.fixture(scope="module")
def page(app):
    SHOTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = launch_chromium(p)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(90_000)   # a loaded 2-core machine is slow; every wait is for an event
        pg.goto(app.url)
        wait_loaded(pg)
        yield pg
        browser.close()


def _report(page) -> str:
    return page.inner_text("#dataset-report")


def test_rejected_files_stay_listed_and_a_bad_dataset_is_refused_before_start(app, page):
    set_run(page, "walk")
    page.set_input_files("#dataset-upload input[type=file]", sorted(str(p) for p in app.src.iterdir()))
    page.wait_for_selector("text=6 images.")
    status = page.inner_text("#dataset-status")
    assert "Added 6 image(s) and 6 caption file(s); 2 file(s) not added" in status, status
    rejected = page.inner_text("#dataset-rejected")
    assert "Not added (2)" in rejected and "broken.png — cannot be decoded" in rejected, rejected
    assert "notes.pdf — not an image" in rejected
    page.wait_for_selector("#dataset-report >> text=6 images")
    fill(page, "trigger-word", "zkw")
    shot(page, "walk-1-rejected-listed")

    _truncated_png(app.service.dataset_dir("walk") / "damaged.png")      # damaged on disk after the upload
    page.reload()                                                         # a reload keeps the run, the word...
    wait_loaded(page)
    assert "run=walk" in page.url
    assert page.input_value("#run-name input") == "walk"
    page.wait_for_function("document.querySelector('#trigger-word input, #trigger-word textarea')?.value === 'zkw'")
    page.wait_for_selector("#dataset-rejected >> text=Not added (2)")           # ... and the list
    page.wait_for_selector(".card-unreadable >> text=cannot be read")          # marked on its card
    page.wait_for_selector("#dataset-report >> text=will stop training")
    assert page.locator(".card-unreadable").count() == 1
    assert "damaged.png" in page.inner_text(".card-unreadable")
    shot(page, "walk-2-unreadable-marked")

    tab(page, "2. Train")
    page.wait_for_selector("#train-trigger >> text=Trigger word: zkw")
    choose(page, "preset", "quick — ")
    fill(page, "field-max_train_steps", 2)
    page.click("#start-btn")
    page.wait_for_selector("#train-notice .notice-error >> text=Not started: 1 file(s)")
    notice_text = page.inner_text("#train-notice")
    assert "damaged.png" in notice_text and "Remove unreadable files" in notice_text
    assert "Started" not in notice_text.replace("Not started", "")
    assert app.service.jobs.snapshot().state == "idle"
    assert page.locator("#train-progress [data-state=idle]").count() == 1
    shot(page, "walk-3-start-refused")
    page.click("#train-notice [data-goto-tab]")                                  # the link opens the Dataset tab
    page.wait_for_selector("#remove-unreadable-btn", state="visible")

    page.click("#remove-unreadable-btn")
    page.wait_for_selector("#dataset-status >> text=Removed 1 unreadable file(s): damaged.png")
    page.wait_for_selector(".card-unreadable", state="detached")
    page.wait_for_function("!document.querySelector('#dataset-report').innerText.includes('will stop training')")
    page.locator(".remove-btn").first.click()                                     # any change refreshes it
    page.wait_for_selector("text=5 images.")
    page.wait_for_function("document.querySelector('#dataset-report')?.innerText?.includes('5 images')")
    box = page.locator(".caption-box textarea").first
    box.fill("")
    box.press("Tab")                                                              # a caption edit too
    page.wait_for_function("document.querySelector('#dataset-report')?.innerText?.includes('1 missing captions')")
    shot(page, "walk-4-report-fresh")


def test_page_stays_on_its_run_while_another_trains(app, page):
    service = app.service
    service.add_files("other", sorted(p for p in app.src.iterdir() if p.name.startswith("img_")))
    service.start_training("other", {**service.preset_form("quick"), "max_train_steps": 40, "batch_size": 1,
                                     "sample_every_n_steps": 0, "save_every_n_steps": 3})
    page.wait_for_selector("#run-notice .notice-warn >> text=Run 'other' is training now")
    assert "this page shows run 'walk'" in page.inner_text("#run-notice")
    page.reload()                                       # the training run is the default, the page keeps its own
    wait_loaded(page)
    assert page.input_value("#run-name input") == "walk"
    page.wait_for_selector("#run-notice >> text=Run 'other' is training now")
    shot(page, "walk-5-other-run-training")

    second = page.context.new_page()                    # same browser, no ?run=: its last run, from storage
    second.goto(app.url)
    wait_loaded(second)
    assert second.input_value("#run-name input") == "walk"
    second.goto(app.url + "?run=other")                 # an address naming a run opens it
    wait_loaded(second)
    assert second.input_value("#run-name input").startswith("other — training")
    second.get_by_role("tab", name="2. Train").click()
    second.wait_for_function("document.querySelector('#train-progress .progress-card')?.dataset.step >= 8")
    log = second.locator("#train-log textarea")
    second.wait_for_function("document.querySelector('#train-log textarea')?.value?.split('\\n').length > 8")
    second.reload()                                     # after a reload the log shows its newest line
    wait_loaded(second)
    second.get_by_role("tab", name="2. Train").click()
    second.wait_for_function("document.querySelector('#train-log textarea')?.value?.split('\\n').length > 8")
    second.wait_for_function("(() => { const t = document.querySelector('#train-log textarea'); "
                             "return !!t && t.scrollHeight > t.clientHeight && t.scrollTop + t.clientHeight >= "
                             "t.scrollHeight - 4; })()")
    x_labels = "#loss-plot [aria-roledescription=axis][aria-label^='X-axis'] .role-axis-label text"
    second.wait_for_selector(x_labels)
    labels = second.locator(x_labels).all_text_contents()
    assert labels and all(t.replace(",", "").isdigit() for t in labels), labels      # whole steps only
    assert labels[0] == "0" and int(labels[-1].replace(",", "")) >= 30, labels     # the axis spans the run
    second.screenshot(path=str(SHOTS / "walk-6-other-run-log.png"), full_page=True)
    log.scroll_into_view_if_needed()
    second.close()
    snap = service.jobs.wait(300)
    assert snap.state == "finished", snap.error


def test_auto_caption_fills_the_editor_and_export_is_one_download_button(app, page):
    from tests.tiny_models import tiny_captioner

    model = tiny_captioner(app.tmp / "blip", "blip")
    tab(page, "1. Dataset")
    page.click("#caption-accordion .label-wrap")
    fill(page, "caption-model", str(model))
    page.click("#caption-missing-btn")
    page.wait_for_selector("#dataset-status >> text=Captioned 1 image(s); kept 4 existing caption(s).",
                           timeout=240_000)   # loading a captioning model is slow on a busy machine
    page.wait_for_function("document.querySelector('.caption-box textarea')?.value?.startsWith('zkw, ')")
    written = sorted(app.service.dataset_dir("walk").glob("*.txt"))[0].read_text(encoding="utf-8")
    assert written.startswith("zkw, ") and page.locator(".caption-box textarea").first.input_value() == written
    page.wait_for_function("document.querySelector('#dataset-report')?.innerText?.includes('0 missing captions')")
    shot(page, "walk-7-auto-captioned")
    page.reload()
    wait_loaded(page)
    page.click("#caption-accordion .label-wrap")
    page.wait_for_function("v => document.querySelector('#caption-model textarea, #caption-model input')?.value === v",
                           arg=str(model))      # the accordion's box may be drawn a moment after the click

    tab(page, "5. Export")
    choose(page, "export-adapter", "other/lora.safetensors")
    page.wait_for_selector("#export-where >> text=On disk")
    assert not page.locator("#export-file").is_visible()
    page.click("#export-btn")
    button = page.locator("#export-file")
    button.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#export-file')?.innerText?.includes('Download lora.safetensors')")
    with page.expect_download() as info:
        button.click()
    target = app.tmp / "downloaded.safetensors"
    info.value.save_as(target)
    from trainer.files.adapters import read_lora_file
    assert info.value.suggested_filename == "lora.safetensors" and read_lora_file(target).modules
    shot(page, "walk-8-download-button")
