"""The service's jobs and their queue with the in-thread runner (fake trainers keep them instant): background
runs and their history, queueing, the persisted queue, failures, snapshots, and what a run's files say when its
trainer died (real trainer processes: test_service_process.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.jobs import ThreadJob
from app.runner import EventTail, pid_alive, read_status
from app.scheduler import QUEUE_FILE, JobBusy, JobQueue, Queued
from app.service import Service, TrainerError
from tests.service_helpers import make_dataset
from trainer.config import TrainConfig
from trainer.events import Control, Finished, Log, Progress, Saved, Started


# --- job manager -----------------------------------------------------------------------------
def fake_train(steps: int = 5, delay: float = 0.01, fail: Exception | None = None, write: bool = True):
    def train(config, listeners, control):
        emit = lambda e: [fn(e) for fn in listeners]  # noqa: E731
        emit(Started(run_dir=config.output_dir, total_steps=steps, trainable_params=10, num_images=3))
        done = 0
        for step in range(1, steps + 1):
            if control.stop_requested:
                break
            if fail and step == 3:
                raise fail
            time.sleep(delay)
            done = step
            emit(Progress(step=step, total_steps=steps, epoch=0, loss=1.0 / step, avg_loss=1.0, lr=1e-4,
                          it_per_s=10.0, eta_s=0.1))
        path = Path(config.output_dir) / "lora.safetensors"
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            emit(Saved(step=done, path=str(path), final=True))
            emit(Finished(path=str(path), steps=done, stopped_early=done < steps, final_loss=0.5, seconds=0.1))
        emit(Log("bye"))
        return path
    return train


def make_jobs(tmp_path, train) -> JobQueue:
    """A JobQueue over ``tmp_path`` whose entries run ``train`` in a thread."""
    def launch(entry, versions):
        config = TrainConfig(output_dir=str(tmp_path / entry.run))
        return ThreadJob(entry.run, config, train, Control, versions, user_errors=(TrainerError,))
    return JobQueue(tmp_path, launch, interval=0.02)


def wait_step(jobs, step: int) -> None:
    deadline = time.monotonic() + 10
    while jobs.snapshot().step < step:
        assert time.monotonic() < deadline, jobs.snapshot()
        time.sleep(0.01)


def test_job_runs_in_background_and_records_history(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=5))
    assert jobs.submit(Queued("r")) is None                      # nothing ahead: started now
    snap = jobs.wait(10)
    assert snap.state == "finished" and snap.step == 5 and not snap.active
    assert [h[0] for h in snap.history] == [1, 2, 3, 4, 5]
    assert snap.result.endswith("lora.safetensors") and any("finished" in line for line in snap.logs)


def test_second_start_is_queued_and_starts_when_the_first_ends(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=1000, delay=0.005))
    jobs.submit(Queued("a"))
    wait_step(jobs, 2)
    assert jobs.submit(Queued("b")) == 1 and jobs.position("b") == 1   # the running one is ahead
    assert jobs.submit(Queued("c")) == 2
    with pytest.raises(JobBusy, match="'a' is already training"):
        jobs.submit(Queued("a"))
    with pytest.raises(JobBusy, match="'b' is already queued"):
        jobs.submit(Queued("b"))
    assert jobs.remove("c") and not jobs.remove("c") and jobs.position("c") is None
    assert [q.run for q in jobs.queued()] == ["b"] and jobs.snapshot().run == "a"
    assert jobs.stop()
    first = jobs.wait(10, run="a")
    assert first.state == "stopped" and 0 < first.step < 1000 and Path(first.result).is_file()
    deadline = time.monotonic() + 10
    while jobs.snapshot().run != "b":                             # the poller starts the next one
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert jobs.queued() == [] and jobs.overview().ahead("b") is None
    assert jobs.last("a") == first and jobs.stop()
    assert jobs.wait(10).state == "stopped"
    assert not jobs.stop()
    assert json.loads((tmp_path / QUEUE_FILE).read_text())["queue"] == []


def test_the_queue_is_kept_on_disk_and_vanished_runs_are_dropped(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=10_000, delay=0.01))
    for run in ("a", "b", "c"):
        (tmp_path / run).mkdir()
        jobs.submit(Queued(run, config={"rank": 4}))
    assert [q.run for q in jobs.queued()] == ["b", "c"]
    (tmp_path / "c").rmdir()
    later = make_jobs(tmp_path, fake_train())                      # a UI restart over the same folder
    assert [(q.run, q.config) for q in later.queued()] == [("b", {"rank": 4})]
    assert any("dropped queued run 'c'" in note for note in later.overview().notes)
    assert [q["run"] for q in json.loads((tmp_path / QUEUE_FILE).read_text())["queue"]] == ["b"]
    end = jobs.shutdown(10)                                        # a quitting UI: stop, start nothing more
    assert end.run == "a" and end.state == "stopped"
    jobs.close()
    jobs.start_polling()
    assert jobs.snapshot().run == "a" and [q.run for q in jobs.queued()] == ["b", "c"]


@pytest.mark.parametrize("fail, expected", [
    (TrainerError("Dataset folder 'x' does not exist; check the path."), "Dataset folder 'x' does not exist"),
    (RuntimeError("boom"), "unexpected error: RuntimeError: boom"),
])
def test_failures_reach_the_snapshot_as_messages(tmp_path, fail, expected):
    jobs = make_jobs(tmp_path, fake_train(fail=fail))
    jobs.submit(Queued("r"))
    snap = jobs.wait(10)
    assert snap.state == "failed" and expected in snap.error


def test_a_run_that_writes_nothing_is_not_reported_as_finished(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(write=False))
    jobs.submit(Queued("r"))
    snap = jobs.wait(10)
    assert snap.state == "failed" and "without writing an adapter" in snap.error


def test_a_run_that_cannot_start_fails_and_the_queue_moves_on(tmp_path):
    def launch(entry, versions):
        if entry.run == "bad":
            raise TrainerError("Base model 'x' cannot be loaded.")
        return ThreadJob(entry.run, TrainConfig(output_dir=str(tmp_path / entry.run)), fake_train(steps=3),
                         Control, versions)
    jobs = JobQueue(tmp_path, launch, interval=0.02)
    jobs.submit(Queued("bad"))
    assert jobs.snapshot().state == "failed" and "could not start: Base model 'x'" in jobs.snapshot().error
    jobs.submit(Queued("good"))
    assert jobs.wait(10).state == "finished" and jobs.snapshot().run == "good"


def test_snapshots_are_consistent_while_training(tmp_path):
    jobs = make_jobs(tmp_path, fake_train(steps=200, delay=0.001))
    jobs.submit(Queued("r"))
    versions = []
    while jobs.snapshot().active:
        s = jobs.snapshot()
        assert len(s.history) == (s.history[-1][0] if s.history else 0)
        versions.append(s.version)
    assert versions == sorted(versions) and len(set(versions)) > 1


def test_start_training_needs_images_and_queues_a_second_run(tmp_path):
    svc = Service(tmp_path / "out", train_fn=fake_train(steps=10_000, delay=0.01))
    with pytest.raises(TrainerError, match="no images yet"):
        svc.start_training("empty", svc.default_form())
    for run in ("a", "b"):
        svc.add_files(run, sorted(make_dataset(tmp_path / "src", n=2).iterdir()))
    svc.start_training("a", svc.default_form())
    with pytest.raises(TrainerError, match="already training"):
        svc.start_training("a", svc.default_form())
    svc.start_training("b", svc.default_form())
    assert svc.jobs.position("b") == 1 and svc.run_state("b") == "queued, 1 ahead"
    assert svc.run_state("a").startswith("training ") and svc.default_run() == "a"
    assert dict((name, label) for label, name in svc.run_choices())["b"] == "b — queued, 1 ahead"
    view, overview = svc.job_view("b")                             # a queued run: the page follows the current one
    assert view.run == "a" and [q.run for q in overview.queue] == ["b"]
    assert svc.jobs.remove("b") and not svc.stop("b") and svc.stop("a")
    assert svc.jobs.wait(10).state == "stopped" and svc.run_state("b") == ""


def test_job_view_of_a_run_that_never_trained_is_idle(tmp_path):
    svc = Service(tmp_path / "out", train_fn=fake_train(steps=3))
    view, overview = svc.job_view("fresh")
    assert (view.state, view.run) == ("idle", "fresh") and not overview.current.active


def test_event_tail_reads_complete_lines_from_its_offset(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []                                       # no file yet
    path.write_text('{"type": "Log", "message": "a"}\n{"type": "Log", "message": "b"}\n{"type": "Lo')
    assert [e["message"] for e in tail.read()] == ["a", "b"] and tail.read() == []   # the cut line waits
    with open(path, "a") as f:
        f.write('g", "message": "c"}\nnot json\n{"type": "Log", "message": "d"}\n')
    assert [e["message"] for e in tail.read()] == ["c", "d"]
    path.write_text('{"type": "Log", "message": "new run"}\n')      # rewritten shorter: from the start
    assert [e["message"] for e in tail.read()] == ["new run"]


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_whose_trainer_died_reads_as_interrupted_and_a_finished_one_is_not_resumed(tmp_path):
    svc = Service(tmp_path / "out", train_fn=fake_train())
    folder = svc.outputs / "cut"
    folder.mkdir()
    TrainConfig(output_dir=str(folder)).save(folder / "config.json")
    events = [{"type": "Started", "run_dir": str(folder), "total_steps": 9, "trainable_params": 1, "num_images": 2}]
    events += [{"type": "Progress", "step": i, "total_steps": 9, "epoch": 0, "loss": 1.0, "avg_loss": 1.0, "lr": 0.1,
                "it_per_s": 1.0, "eta_s": 1.0} for i in (1, 2, 3, 2, 3, 4)]            # resumed once, from step 1
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    status = {"state": "running", "pid": dead_pid(), "step": 3, "total_steps": 9}
    (folder / "status.json").write_text(json.dumps(status))
    assert read_status(folder)["state"] == "interrupted" and not pid_alive(status["pid"])
    view, _ = svc.job_view("cut")
    assert view.state == "interrupted" and view.resumable and [h[0] for h in view.history] == [1, 2, 3, 4]
    assert "no checkpoint yet, so Resume starts it again from step 0" in view.error
    assert svc.run_choices() == [("cut — interrupted at 4", "cut")]
    (folder / "status.json").write_text(json.dumps({**status, "state": "finished", "step": 9}))
    assert svc.run_state("cut") == "finished" and svc.job_view("cut")[0].state == "finished"
    with pytest.raises(TrainerError, match="already finished all its 9 steps"):
        svc.resume("cut")
    with pytest.raises(TrainerError, match="has never trained"):
        svc.resume("other")
