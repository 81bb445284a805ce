"""What a run leaves on disk for any front end, alive or restarted: ``events.jsonl`` (every event, one JSON
object per line, flushed as it happens: the run's log of record), ``status.json`` (state, pid, last step),
TensorBoard event files when tensorboard is installed, and the request files another process uses to ask a
running trainer to stop, save or sample (``FileControl``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from ..events import Control, Event, Failed, Finished, Progress, Started, Validation
from ..fileio import atomic_write_text

EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"
CONTROL_DIR = "control"          # <run>/control/{stop,save,sample}: created by a front end, consumed here


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def event_to_dict(event: Event) -> dict:
    return {"type": type(event).__name__, "time": round(time.time(), 3), **dataclasses.asdict(event)}


class RunRecord:
    """A listener that appends every event to ``events.jsonl`` and keeps ``status.json`` current.
    A new run starts both afresh; a resumed run (``append``) continues them."""

    def __init__(self, run_dir: str | Path, *, append: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._events = open(self.run_dir / EVENTS_FILE, "a" if append else "w", encoding="utf-8")
        self._status = {"state": "running", "pid": os.getpid(), "started": round(time.time(), 3),
                        "step": 0, "total_steps": 0, "adapter": None, "message": ""}
        self._last_write = 0.0
        self._write_status()

    def __call__(self, event: Event) -> None:
        self._events.write(json.dumps(event_to_dict(event), default=str) + "\n")
        self._events.flush()
        if isinstance(event, Started):
            self._status["total_steps"] = event.total_steps
        elif isinstance(event, (Progress, Validation)):
            self._status["step"] = event.step
            if time.monotonic() - self._last_write < 1.0:   # status is a summary: at most once a second
                return
        elif isinstance(event, Finished):
            self._status.update(state="stopped" if event.stopped_early else "finished", step=event.steps,
                                adapter=event.path)
        elif isinstance(event, Failed):
            self._status.update(state="failed", message=event.message)
        else:
            return
        self._write_status()

    def _write_status(self) -> None:
        self._last_write = time.monotonic()
        atomic_write_text(self.run_dir / STATUS_FILE, json.dumps(self._status, indent=1) + "\n")

    def close(self) -> None:
        if self._status["state"] == "running":     # ended without Finished/Failed: say so
            self._status["state"] = "interrupted"
        self._write_status()
        self._events.close()


def read_events(run_dir: str | Path) -> list[dict]:
    """Every complete line of a run's ``events.jsonl`` (a line cut by a kill is ignored)."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class FileControl(Control):
    """``Control`` that also answers requests made as files in ``<run>/control/`` by another process (the web
    UI starting the trainer as a child): ``stop``, ``save`` and ``sample``; each is consumed when seen."""

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.folder = Path(run_dir) / CONTROL_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in ("stop", "save", "sample"):             # requests for an earlier process are stale
            (self.folder / name).unlink(missing_ok=True)

    def _take(self, name: str) -> bool:
        try:
            (self.folder / name).unlink()
            return True
        except FileNotFoundError:
            return False

    @property
    def stop_requested(self) -> bool:
        if self._take("stop"):
            self.stop()
        return super().stop_requested

    def take_save(self) -> bool:
        return self._take("save") or super().take_save()

    def take_sample(self) -> bool:
        return self._take("sample") or super().take_sample()


def request(run_dir: str | Path, what: str) -> None:
    """Ask the trainer running in ``run_dir`` to ``stop``, ``save`` or ``sample`` (answered within a step)."""
    if what not in ("stop", "save", "sample"):
        raise ValueError(what)
    folder = Path(run_dir) / CONTROL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / what).touch()


class TensorBoardLog:
    """Loss, validation loss, learning rate and sample images as TensorBoard scalars/images in
    ``<run>/tensorboard/``. ``create`` returns None (and why) when tensorboard is not installed."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def create(cls, run_dir: str | Path) -> tuple["TensorBoardLog | None", str]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None, "TensorBoard logging off: `pip install tensorboard` to get <run>/tensorboard/"
        return cls(SummaryWriter(str(Path(run_dir) / "tensorboard"))), f"TensorBoard: {Path(run_dir) / 'tensorboard'}"

    def __call__(self, event: Event) -> None:
        from ..events import Sample

        if isinstance(event, Progress):
            self.writer.add_scalar("loss/train", event.loss, event.step)
            self.writer.add_scalar("lr", event.lr, event.step)
        elif isinstance(event, Validation):
            self.writer.add_scalar("loss/validation", event.loss, event.step)
        elif isinstance(event, Sample):
            import numpy as np
            from PIL import Image

            for i, path in enumerate(event.paths):
                self.writer.add_image(f"sample/{i}", np.asarray(Image.open(path).convert("RGB")), event.step,
                                      dataformats="HWC")
        elif isinstance(event, (Finished, Failed)):
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
