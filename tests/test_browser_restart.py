"""A web UI killed during a run, and started again, in headless Chromium: `python launch.py` starts the run as a
trainer process, is killed with SIGKILL (the trainer trains on), is started again over the same outputs folder,
and the page shows the run advancing with its loss history from before the restart, then finished. Beside it, a
run whose trainer died earlier shows as interrupted; its Resume queues behind the training run, the queue
outlives the restart and the run is removed from it. Screenshots go to ``screenshots/`` (git-ignored).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.train_view import CHART_POINTS
from tests.service_helpers import make_dataset
from trainer.config import TrainConfig
from tests.browser_helpers import CHROMIUM, SHOTS, _free_port, choose, fill, launch_chromium, open_page, \
    progress_state, set_run, shot, tab, wait_loaded, wait_state

ROOT = Path(__file__).resolve().parent.parent
STEPS = 500          # ~25 s of the built-in model at batch 1: the run outlives the restart

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


def start_ui(outputs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`python launch.py` on a free port; returns it and its URL once it serves."""
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), "--outputs", str(outputs),
                                 "--data-root", str(outputs.parent)],      # the dataset is imported from there
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    end = time.monotonic() + 120
    while f":{port}" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < end, "the UI did not start: " + log.read_text(errors="replace")
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}/"


def chart_steps(page, series: str = "training loss") -> list[int]:
    """The steps of the chart's points of ``series`` (Vega SVG: each point's aria-label names its step)."""
    sel = f"#loss-plot [aria-roledescription=point][aria-label*='series: {series}']"
    labels = page.locator(sel).evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    return [int(dict(p.split(": ", 1) for p in text.split("; "))["step"].replace(",", "")) for text in labels]


def interrupted_run(folder: Path, steps: int = 7) -> None:
    """What a trainer killed at ``steps`` leaves: config.json, its events and a status saying running, with a
    pid that is gone."""
    folder.mkdir(parents=True)
    TrainConfig(max_train_steps=50, output_dir=str(folder)).save(folder / "config.json")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    events = [{"type": "Started", "run_dir": str(folder), "total_steps": 50, "trainable_params": 10, "num_images": 4}]
    events += [{"type": "Progress", "step": i, "total_steps": 50, "epoch": 0, "loss": 0.5 / i, "avg_loss": 0.3,
                "lr": 1e-3, "it_per_s": 20.0, "eta_s": 2.0, "time": time.time()} for i in range(1, steps + 1)]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    (folder / "status.json").write_text(json.dumps({"state": "running", "pid": gone.pid, "step": steps,
                                                    "total_steps": 50}), encoding="utf-8")


@pytest.fixture
def setup(tmp_path):
    outputs = tmp_path / "outputs"
    data = make_dataset(tmp_path / "src", n=8, size=64)
    interrupted_run(outputs / "cut")
    procs: list[subprocess.Popen] = []
    yield outputs, data, tmp_path / "ui.log", procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for status in outputs.glob("*/status.json"):           # the trainer the UI started, if still running
        pid = json.loads(status.read_text()).get("pid")
        try:
            if pid and Path(f"/proc/{pid}/cmdline").read_bytes().find(b"trainer") >= 0:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_killed_ui_restarts_and_reattaches_to_its_run(setup):
    outputs, data, log, procs = setup
    SHOTS.mkdir(exist_ok=True)
    ui, url = start_ui(outputs, log)
    procs.append(ui)
    with playwright_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = open_page(browser, url, timeout=180_000)   # a loaded 2-core CI machine is slow
        set_run(page, "survive")
        fill(page, "dataset-folder", str(data))
        page.click("#import-btn")
        page.wait_for_selector("text=8 images.", timeout=90_000)
        tab(page, "2. Train")
        fill(page, "field-max_train_steps", STEPS)
        fill(page, "field-batch_size", 1)
        page.click("#start-btn")
        page.wait_for_selector("#train-notice >> text=Started")
        wait_state(page, ("running",), timeout=120, min_step=1)

        choose(page, "run-name", "cut — interrupted at 7")            # a run whose trainer died earlier
        page.wait_for_selector("#train-progress [data-state=interrupted][data-run=cut]")
        assert "Press Resume to continue it" in page.inner_text("#train-progress")
        page.click("#resume-btn")                                      # survive trains: the resume waits
        page.wait_for_selector("#train-notice >> text=Queued the resume of 'cut', 1 ahead")
        page.wait_for_selector("#train-queue li[data-run=cut] >> text=queued, 1 ahead (resume)")
        shot(page, "10-interrupted-run-resume-queued")
        choose(page, "run-name", "survive — training")
        _, before = wait_state(page, ("running",), timeout=120, min_step=20)
        ui.send_signal(signal.SIGKILL)                      # the UI dies; its trainer does not
        ui.wait(10)
        status = json.loads((outputs / "survive" / "status.json").read_text())
        assert status["state"] == "running" and Path(f"/proc/{status['pid']}").exists()

        ui, url = start_ui(outputs, log)
        procs.append(ui)
        assert "Reattached to run 'survive'" in log.read_text() and "1 more queued" in log.read_text()
        page.goto(url)
        wait_loaded(page)
        assert page.input_value("#run-name input").startswith("survive — training")
        tab(page, "2. Train")
        page.wait_for_selector("#train-queue li[data-run=cut] >> text=queued, 1 ahead (resume)")   # kept
        page.click("#queue-remove-btn")
        page.wait_for_selector("#train-notice >> text=Removed 'cut' from the queue")
        page.wait_for_selector("#train-queue li", state="detached")
        state, after = wait_state(page, ("running",), timeout=180, min_step=before + 1)
        page.wait_for_function("n => document.querySelectorAll(\"#loss-plot [aria-roledescription=point]"
                               "[aria-label*='series: training loss']\").length >= n", arg=min(after, CHART_POINTS))
        steps = chart_steps(page)
        if steps[-1] <= CHART_POINTS:                       # not thinned yet: every step since the first
            assert steps[:before] == list(range(1, before + 1)), steps[:before + 5]   # the history from before
        else:                                               # a slow restart: thinned, still from step 1
            assert steps[0] == 1 and steps == sorted(set(steps)) and steps[-1] >= after
        assert "reattached to the trainer process of run 'survive'" in page.input_value("#train-log textarea")
        shot(page, "11-restarted-ui-reattached")

        wait_state(page, ("finished",), timeout=300)
        assert f"finished after {STEPS} steps" in page.input_value("#train-log textarea")
        page.wait_for_function("n => document.querySelectorAll(\"#loss-plot [aria-roledescription=point]"
                               "[aria-label*='series: training loss']\").length === n", arg=CHART_POINTS + 1)
        steps = chart_steps(page)                            # thinned to CHART_POINTS, first and last kept
        assert steps[0] == 1 and steps[-1] == STEPS and steps == sorted(set(steps))
        assert (outputs / "survive" / "lora.safetensors").is_file()
        page.wait_for_function("document.querySelector('#run-name input').value.startsWith('survive — finished')")
        shot(page, "12-restarted-ui-finished")
        assert progress_state(page) == ("finished", STEPS)
        browser.close()
    ui.send_signal(signal.SIGTERM)                           # nothing trains: a clean exit
    assert ui.wait(30) == 128 + signal.SIGTERM
