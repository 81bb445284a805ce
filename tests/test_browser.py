"""End to end in headless Chromium: dataset upload and caption edit (with the report's buckets), the tag shuffle
preview, training to the end, a stopped run and a second run queued behind it (and removed), preview at strengths
0 and 1, blending, downloading the export, and a run with held-out images drawing its validation loss in the chart.
Screenshots of each step go to ``screenshots/`` (git-ignored). The tests share one app and one page and run in file
order.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.browser_helpers import (  # noqa: F401 - screenshot_on_failure is an autouse fixture
    CHROMIUM, ROOT, SHOTS, choose, fill, image_pixels, launch_chromium, progress_state, screenshot_on_failure, serve,
    set_run, shot, tab, wait_loaded, wait_state)

EXAMPLE = ROOT / "examples" / "zkw"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

E2E_PRESET = {  # a few seconds of CPU on the built-in model
    "description": "browser test: tiny and fast", "rank": 4, "alpha": 4.0, "learning_rate": 1e-3,
    "max_train_steps": 12, "batch_size": 1, "lr_scheduler": "constant", "sample_every_n_steps": 6,
    "sample_steps": 2, "sample_prompts": ["zkw, a white disc"],
}


STEP_SECONDS = 0.4


def _dataset(tmp: Path) -> Path:
    images = [p for p in EXAMPLE.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    if 30 <= len(images) <= 50:
        return EXAMPLE
    from tests.test_service import make_dataset
    return make_dataset(tmp / "dataset", n=30, size=72)


def _paced_train(config, listeners, control):
    """The real trainer, with each step held for at least STEP_SECONDS so a fast machine still shows the
    page moving between two polls (the UI polls once a second)."""
    from trainer.events import Progress
    from trainer.loop.train import train

    def pace(event):
        if isinstance(event, Progress):
            time.sleep(STEP_SECONDS)
    return train(config, listeners=[*listeners, pace], control=control)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app.service import Sandbox, Service
    from trainer.config import PRESETS_DIR

    tmp = tmp_path_factory.mktemp("browser")
    presets = tmp / "presets"
    shutil.copytree(PRESETS_DIR, presets)
    (presets / "e2e.json").write_text(json.dumps(E2E_PRESET), encoding="utf-8")
    service = Service(tmp / "outputs", presets_dir=presets, train_fn=_paced_train,  # imports: tmp or examples/
                      sandbox=Sandbox.build(tmp / "outputs", data_roots=[tmp, EXAMPLE]))
    # The trainer's first import takes a while on a busy machine: do it while the browser starts.
    threading.Thread(target=service.warm_up, daemon=True).start()
    url, demo = serve(service)
    data = _dataset(tmp)
    n_images = sum(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in data.iterdir())
    yield SimpleNamespace(url=url, service=service, data=data, n_images=n_images, tmp=tmp)
    service.jobs.stop()
    service.jobs.wait(120)
    demo.close()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(app, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.external = []   # any request that leaves localhost: the app must work offline
    pg.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
          else pg.external.append(r.url))
    pg.goto(app.url)
    wait_loaded(pg)
    yield pg
    context.close()


# --- helpers ---------------------------------------------------------------------------------
def test_dataset_upload_and_caption_edit(app, page):
    set_run(page, "e2e")
    files = sorted(str(p) for p in app.data.iterdir() if p.is_file())
    page.set_input_files("#dataset-upload input[type=file]", files)
    page.wait_for_selector(f"text={app.n_images} images.", timeout=90_000)
    page.wait_for_selector("#dataset-report .report")
    assert f"{app.n_images} images" in page.inner_text("#dataset-report")
    buckets = page.inner_text("#dataset-report .buckets")   # square images at the built-in model's 64 px
    assert f"64×64 · {app.n_images} images" in buckets and "mean aspect error 0.000" in buckets, buckets

    box = page.locator(".caption-box textarea").first
    box.fill("zkw, a disc edited in the browser")
    box.press("Tab")
    page.wait_for_selector("#dataset-status >> text=Saved the caption of")
    first = sorted(p for p in (app.service.dataset_dir("e2e")).glob("*.txt"))[0]
    assert first.read_text(encoding="utf-8") == "zkw, a disc edited in the browser"
    fill(page, "trigger-word", "zkw")
    shot(page, "01-dataset")


def test_tag_tools_preview_follows_the_train_settings(app, page):
    page.click("#tag-tools-accordion .label-wrap")
    page.click("#tag-preview-btn")
    page.wait_for_selector("#tag-preview >> text=Shuffle tags is off")
    tab(page, "2. Train")
    page.click("#advanced .label-wrap")
    page.locator("#field-shuffle_tags input[type=checkbox]").check()
    fill(page, "field-keep_tokens", 1)
    tab(page, "1. Dataset")
    page.click("#tag-preview-btn")
    page.wait_for_selector("#tag-preview >> text=click again for another draw")
    trained = page.locator("#tag-preview tbody tr td:nth-child(3)")
    assert trained.count() == 3
    assert all(text.startswith("zkw, ") for text in trained.all_inner_texts())   # the trigger word stays first
    assert page.locator("#tag-preview tbody b").all_inner_texts() == ["zkw"] * 3
    shot(page, "01b-tag-preview")
    tab(page, "2. Train")
    fill(page, "field-keep_tokens", 9)
    tab(page, "1. Dataset")
    page.click("#tag-preview-btn")
    page.wait_for_selector("#tag-preview .notice-error >> text=keep_tokens = 9")
    tab(page, "2. Train")                       # leave the form as the next test expects it
    fill(page, "field-keep_tokens", 0)
    page.locator("#field-shuffle_tags input[type=checkbox]").uncheck()
    page.click("#advanced .label-wrap")
    tab(page, "1. Dataset")


def test_train_to_the_end_with_live_progress(app, page):
    tab(page, "2. Train")
    fill(page, "field-rank", 0)                       # an invalid value is named next to its field
    page.click("#start-btn")
    page.wait_for_selector("#train-notice >> text=Fix these settings first")
    page.wait_for_selector("#field-rank.field-invalid >> text=16 is a good start")
    shot(page, "02a-invalid-setting")
    choose(page, "preset", "e2e")
    page.wait_for_function("document.querySelector('#field-max_train_steps input').value === '12'")
    assert not page.locator("#field-rank.field-invalid").count()
    assert page.input_value("#field-rank input") == "4"
    assert page.input_value("#field-sample_prompts textarea") == "zkw, a white disc"
    page.click("#start-btn")
    steps, first_chart = set(), None    # what a person watching would have seen change
    deadline = time.time() + 150
    while time.time() < deadline:
        state, step = progress_state(page)
        if state == "failed":
            pytest.fail("training failed: " + page.inner_text("#train-progress"))
        if step:
            steps.add(step)
        if step and state == "running" and first_chart is None:
            page.wait_for_timeout(700)     # let the chart draw this poll's points
            first_chart = page.locator("#loss-plot").screenshot()
            shot(page, "02-training")
        if state == "finished":
            break
        page.wait_for_timeout(200)
    assert len(steps) >= 2, f"progress did not move: saw steps {sorted(steps)}"
    page.wait_for_timeout(1500)
    assert first_chart is not None and page.locator("#loss-plot").screenshot() != first_chart, \
        "the loss chart did not change while training"
    wait_state(page, ("finished",))
    page.wait_for_selector("#train-progress >> text=Adapter saved")
    assert page.locator("#train-samples img").count() >= 1
    assert "finished after 12 steps" in page.input_value("#train-log textarea")
    assert (app.service.outputs / "e2e" / "lora.safetensors").is_file()
    shot(page, "03-trained")


def test_stop_a_run_and_queue_a_second(app, page, browser):
    tab(page, "1. Dataset")
    set_run(page, "e2e-stop")
    fill(page, "dataset-folder", str(app.data))
    page.click("#import-btn")
    page.wait_for_selector(f"text={app.n_images} images.", timeout=90_000)
    tab(page, "2. Train")
    fill(page, "field-max_train_steps", 500)
    fill(page, "field-sample_every_n_steps", 0)
    page.click("#start-btn")
    wait_state(page, ("running",), min_step=1)

    other = browser.new_page(viewport={"width": 1280, "height": 900})   # a second tab reattaches
    other.goto(app.url)
    other.get_by_role("tab", name="2. Train").click()
    other.wait_for_selector("#train-progress [data-state=running]", timeout=60_000)
    other.wait_for_selector("#train-queue >> text=Now training: e2e-stop")
    choose(other, "run-name", "e2e — finished")                         # the picker says each run's state
    other.wait_for_function("document.querySelector('#run-notice')?.innerText.trim().endsWith('/e2e')")
    other.wait_for_selector("#train-progress [data-state=finished][data-run=e2e]")
    assert other.inner_text("#start-btn") == "Add to queue"
    other.click("#start-btn")                                           # while e2e-stop trains: queued
    other.wait_for_selector("#train-notice >> text=Queued run 'e2e', 1 ahead")
    other.wait_for_selector("#train-queue li[data-run=e2e] >> text=queued, 1 ahead")
    assert [q.run for q in app.service.jobs.queued()] == ["e2e"] and app.service.jobs.snapshot().run == "e2e-stop"
    other.screenshot(path=str(SHOTS / "04-second-tab-queued.png"), full_page=False)
    assert other.input_value("#queue-pick input") == "e2e"
    other.click("#queue-remove-btn")
    other.wait_for_selector("#train-notice >> text=Removed 'e2e' from the queue")
    other.wait_for_selector("#train-queue li", state="detached")
    assert app.service.jobs.queued() == []
    other.close()

    page.click("#stop-btn")
    state, step = wait_state(page, ("stopped",))
    assert 1 <= step < 500
    page.wait_for_selector("#train-progress >> text=Adapter saved")
    assert (app.service.outputs / "e2e-stop" / "lora.safetensors").is_file()
    shot(page, "05-stopped")


def test_preview_strength_0_and_1_differ(app, page):
    page.reload()
    wait_loaded(page)
    tab(page, "3. Preview")
    choose(page, "preview-adapter", "e2e/lora.safetensors")
    fill(page, "preview-prompt", "zkw, a white disc")
    fill(page, "preview-steps", 3)
    page.click("#preview-render")
    page.wait_for_selector("#preview-adapted img", timeout=120_000)
    page.wait_for_selector("#preview-base img")
    base, adapted = image_pixels(page, "#preview-base img"), image_pixels(page, "#preview-adapted img")
    assert base.size == adapted.size and base.tobytes() != adapted.tobytes()
    fill(page, "sweep-strengths", "0, 0.5, 1")
    page.click("#sweep-btn")
    page.wait_for_function("document.querySelectorAll('#sweep-grid img').length >= 3", timeout=120_000)
    assert app.service.model_loads == 1
    shot(page, "06-preview")


def test_blend_two_adapters(app, page):
    tab(page, "4. Blend")
    choose(page, "blend-adapter-0", "e2e/lora.safetensors")
    choose(page, "blend-adapter-1", "e2e-stop/lora.safetensors")
    fill(page, "blend-prompt", "zkw, a white disc")
    fill(page, "blend-steps", 3)
    page.click("#blend-preview")
    page.wait_for_selector("#blend-image img", timeout=120_000)
    fill(page, "blend-name", "mix")
    page.click("#blend-save")
    page.wait_for_selector("#blend-notice >> text=Saved the blend")
    from trainer.files.adapters import read_lora_file
    lora = read_lora_file(app.service.outputs / "_blends" / "mix.safetensors")
    merged = lora.metadata["modelspec.merged_from"]
    assert lora.modules and merged.count("lora.safetensors") == 2, merged
    shot(page, "07-blend")


def test_export_download_is_a_valid_adapter(app, page):
    tab(page, "5. Export")
    choose(page, "export-adapter", "e2e/lora.safetensors")
    page.wait_for_selector("#export-where >> text=On disk")
    page.click("#export-btn")
    button = page.locator("#export-file")
    button.wait_for(state="visible", timeout=60_000)
    page.wait_for_function("document.querySelector('#export-file').innerText.includes('Download lora.safetensors')")
    with page.expect_download() as info:
        button.click()
    target = app.tmp / "downloaded.safetensors"
    info.value.save_as(target)
    from trainer.files.adapters import read_lora_file
    lora = read_lora_file(target)
    assert lora.format == "kohya" and lora.modules
    assert all(k.startswith("lora_unet_") for k in lora.modules)
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["ss_network_module"] == "networks.lora"
    shot(page, "08-export")
    assert page.external == [], f"the page reached outside localhost: {page.external[:5]}"


def test_validation_loss_is_drawn_beside_the_training_loss(app, page):
    page.reload()
    wait_loaded(page)
    set_run(page, "e2e-val")
    fill(page, "dataset-folder", str(app.data))
    page.click("#import-btn")
    page.wait_for_selector(f"text={app.n_images} images.", timeout=90_000)
    tab(page, "2. Train")
    choose(page, "preset", "e2e")
    page.wait_for_function("document.querySelector('#field-max_train_steps input').value === '12'")
    fill(page, "field-max_train_steps", 8)
    fill(page, "field-sample_every_n_steps", 0)
    page.click("#advanced .label-wrap")
    fill(page, "field-validation_split", 2)          # two held-out images, as a person types it
    fill(page, "field-validate_every_n_steps", 4)
    page.click("#advanced .label-wrap")
    page.click("#start-btn")
    wait_state(page, ("finished",), timeout=240, run="e2e-val")
    job = app.service.jobs.last("e2e-val")
    measured = job.validation
    assert len(measured) >= 3, (f"the run measured too few validation losses to draw a line: {measured}; "
                                f"job {job.run} {job.state} step {job.step}; log: {job.logs[-12:]}")

    # The chart is Vega SVG: each datum has a (hover) point whose aria-label names its step, loss and series.
    points = "#loss-plot [aria-roledescription=point][aria-label*='series: validation loss']"
    page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n", arg=[points, len(measured)])
    drawn = []
    for text in page.locator(points).evaluate_all("els => els.map(e => e.getAttribute('aria-label'))"):
        fields = dict(part.split(": ", 1) for part in text.split("; "))
        drawn.append((int(fields["step"]), float(fields["loss"])))
    assert [s for s, _ in drawn] == [s for s, _ in measured]
    assert [v for _, v in drawn] == pytest.approx([v for _, v in measured], rel=1e-6)

    lines = page.locator("#loss-plot [aria-roledescription='line mark']")
    strokes = {label.split("series: ")[1]: stroke for label, stroke in lines.evaluate_all(
        "els => els.map(e => [e.getAttribute('aria-label'), e.getAttribute('stroke')])")}
    assert set(strokes) == {"training loss", "running average", "validation loss"}
    assert len(set(strokes.values())) == 3, f"two series share a colour: {strokes}"
    legend = page.locator("#loss-plot .role-legend-label text").all_text_contents()
    assert legend == ["training loss", "running average", "validation loss"]
    step, value = measured[-1]
    assert step > 0 and f"validation {value:.4f} at step {step}" in page.inner_text("#train-progress")
    shot(page, "09-validation")
