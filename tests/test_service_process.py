"""Training in a trainer process (the web UI's default): a run's snapshot follows the files the child writes,
Stop checkpoints it, a second run queues behind the first and starts when it ends, a restarted UI (a new Service
over the same outputs) reattaches to a live run with its whole loss history and shows a killed one as
interrupted, and Resume takes it to its full step count. Real CLI processes on the built-in model.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from app.runner import ProcessJob, pid_alive
from app.scheduler import QUEUE_FILE
from app.service import Service
from tests.service_helpers import make_dataset
from trainer.config import PRESETS_DIR


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """An outputs folder with runs a, b, c, k (4 tiny images each); every trainer left running is killed."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")            # the children share two cores with the test
    out = tmp_path / "outputs"
    src = make_dataset(tmp_path / "src", n=4, size=64)
    for run in ("a", "b", "c", "k"):
        (out / run / "dataset").mkdir(parents=True)
        for p in src.iterdir():
            (out / run / "dataset" / p.name).write_bytes(p.read_bytes())
    yield out
    for status in out.glob("*/status.json"):              # only pids our trainers wrote
        pid = json.loads(status.read_text()).get("pid")
        if pid_alive(pid) and pid != os.getpid():
            os.kill(pid, signal.SIGKILL)


def form(svc: Service, steps: int, **extra) -> dict:
    return {**svc.preset_form("quick"), "max_train_steps": steps, "batch_size": 1, "sample_every_n_steps": 0,
            "checkpoint_every_n_steps": 20, **extra}


def until(what, timeout: float = 120, every: float = 0.05):
    """Poll ``what()`` until it is truthy; its value."""
    end = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < end, "timed out"
        time.sleep(every)


def test_queue_reattach_stop_then_the_next_run_finishes(outputs):
    first = Service(outputs, presets_dir=PRESETS_DIR)
    first.start_training("a", form(first, 5000))
    snap = first.jobs.snapshot()
    assert snap.state == "starting" and snap.run == "a" and snap.total_steps == 5000
    seen = until(lambda: first.jobs.snapshot().step >= 3 and first.jobs.snapshot())
    later = until(lambda: first.jobs.snapshot().step > seen.step and first.jobs.snapshot())
    assert later.state == "running" and [h[0] for h in later.history] == list(range(1, later.step + 1))
    assert (outputs / "a" / "trainer.log").is_file() and json.loads((outputs / "a" / "config.json").read_text())[
        "max_train_steps"] == 5000

    first.start_training("b", form(first, 30))
    first.start_training("c", form(first, 30))
    assert (first.jobs.position("b"), first.jobs.position("c")) == (1, 2)
    assert first.jobs.remove("c") and first.run_state("c") == ""
    assert [q["run"] for q in json.loads((outputs / QUEUE_FILE).read_text())["queue"]] == ["b"]

    first.jobs.close()                                     # the UI goes away; its trainer keeps going
    at_restart = first.jobs.snapshot().step
    svc = Service(outputs, presets_dir=PRESETS_DIR)        # ... and a new one starts over the same folder
    snap = svc.jobs.snapshot()
    assert snap.run == "a" and snap.active and [q.run for q in svc.jobs.queued()] == ["b"]
    assert snap.history[0][0] == 1 and len(snap.history) >= at_restart
    assert any("reattached" in line for line in snap.logs) and svc.default_run() == "a"
    until(lambda: svc.jobs.snapshot().step > snap.step)
    assert svc.run_state("a").startswith("training ") and svc.run_state("b") == "queued, 1 ahead"

    assert svc.jobs.stop()
    stopped = svc.jobs.wait(120, run="a")
    assert stopped.state == "stopped" and stopped.step < 5000 and Path(stopped.result).is_file()
    assert (outputs / "a" / "checkpoints" / f"step-{stopped.step:06d}" / "state.json").is_file()
    assert stopped.resumable and svc.run_state("a") == f"stopped at {stopped.step}"

    done = svc.jobs.wait(180, run="b")                      # the queue moved on by itself
    assert done.state == "finished", done.error or done.logs[-5:]
    assert done.step == 30 and [h[0] for h in done.history] == list(range(1, 31))
    assert Path(done.result) == outputs / "b" / "lora.safetensors" and Path(done.result).is_file()
    assert svc.run_state("b").startswith("finished") and svc.jobs.queued() == []


def test_a_killed_trainer_is_interrupted_and_resume_reaches_the_full_step_count(outputs):
    svc = Service(outputs, presets_dir=PRESETS_DIR)
    svc.start_training("k", form(svc, 200))
    # killed between two checkpoints, so the resume repeats the steps after the last one
    until(lambda: svc.jobs.snapshot().step >= 25 and svc.jobs.snapshot().step % 20 >= 5, every=0.02)
    pid = json.loads((outputs / "k" / "status.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    snap = svc.jobs.wait(60, run="k")
    assert snap.state == "interrupted" and snap.resumable and "killed by signal 9" in snap.error
    newest = max(int(p.name[5:]) for p in (outputs / "k" / "checkpoints").glob("step-*"))
    assert f"newest checkpoint (step-{newest:06d})" in snap.error and newest < snap.step

    svc.jobs.close()
    again = Service(outputs, presets_dir=PRESETS_DIR)      # a restart: nothing to reattach, the record remains
    assert not again.jobs.snapshot().active
    view, _ = again.job_view("k")
    assert view.state == "interrupted" and view.resumable and view.step == snap.step
    assert [h[0] for h in view.history] == list(range(1, snap.step + 1))
    assert again.run_state("k") == f"interrupted at {snap.step}"
    assert dict((n, label) for label, n in again.run_choices())["k"] == f"k — interrupted at {snap.step}"

    again.resume("k")
    done = again.jobs.wait(180, run="k")
    assert done.state == "finished", done.error or done.logs[-5:]
    assert done.step == 200 and [h[0] for h in done.history] == list(range(1, 201))   # one line, no repeats
    assert any("resumed from" in line for line in done.logs) and Path(done.result).is_file()
    assert again.job_view("k")[0].state == "finished" and again.run_state("k").startswith("finished")


def test_a_trainer_that_exits_before_training_is_a_failure_with_its_message(outputs):
    job = ProcessJob.launch("a", outputs / "a", iter(range(1, 10_000)), config_json='{"rank": 0}\n')
    assert job.snapshot().state == "starting"
    until(lambda: job.poll() or not job.snapshot().active and job.snapshot(), every=0.1)
    snap = job.snapshot()
    assert snap.state == "failed" and "exited (exit code 2) before training began" in snap.error
    assert "rank" in snap.error and str(outputs / "a" / "trainer.log") in snap.error
