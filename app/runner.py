"""Training as a child process: ``ProcessJob`` starts ``python -m trainer train`` (or ``--resume``; under
``accelerate launch`` for several GPUs, ``trainer_command``) in its own session with its output in
``<run>/trainer.log``, or attaches to one a previous UI started, and follows it from the files it writes:
``events.jsonl`` (tailed from a byte offset) and ``status.json``. Also what a run's files say when no process is
followed (``read_status``, ``record_snapshot``) and whether a pid is a live trainer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from trainer.fileio import atomic_write_text
from trainer.loop.records import EVENTS_FILE, STATUS_FILE, process_exists
from trainer.loop.records import request as file_request

from app.jobs import EventFold, JobSnapshot, stamp

ROOT = Path(__file__).resolve().parent.parent      # where `python -m trainer` is importable (a checkout or
#                                                    site-packages); the trainer runs in the UI's cwd, so relative
#                                                    model paths mean what they meant to the UI
LOG_FILE = "trainer.log"


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees (0 without CUDA). Imports torch: call it when asked, not at import."""
    import torch

    return int(torch.cuda.device_count())


def trainer_command(args: list[str], processes: int = 1) -> list[str]:
    """The command that trains: ``python -m trainer train ARGS``, or with ``processes`` > 1 the same module under
    ``accelerate launch``, one process per GPU."""
    if processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(int(processes)),
                "-m", "trainer", "train", *args]
    return [sys.executable, "-m", "trainer", "train", *args]


def pid_alive(pid: int | None) -> bool:
    """A process with this pid runs and (where /proc tells) is a trainer, not a zombie or a reused pid."""
    if not isinstance(pid, int) or pid <= 0 or not process_exists(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X") and b"trainer" in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def read_status(run_dir: Path) -> dict | None:
    """The run's status.json, with ``state`` "interrupted" where it says running but its process is gone."""
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    if status.get("state") == "running" and not pid_alive(status.get("pid")):
        status["state"] = "interrupted"
    return status


class EventTail:
    """The new complete lines of a growing events.jsonl: remembers the byte offset, leaves a partial last line
    for the next read, skips a line that is not JSON (one cut by a kill)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
            if size < self.offset:          # rewritten by a new run of the same folder: start over
                self.offset = 0
            if size == self.offset:
                return []
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "type" in event:
                events.append(event)
        return events


def fold_events(fold: EventFold, events: list[dict]) -> None:
    for event in events:
        fields = {k: v for k, v in event.items() if k not in ("type", "time")}
        fold.add(str(event["type"]), SimpleNamespace(**fields), event.get("time"))


def _ended(fold: EventFold, status: dict | None) -> dict:
    """State, result and message of a run whose process is gone, from its status and events."""
    state = (status or {}).get("state") or fold.outcome or "interrupted"
    if state == "running":
        state = "interrupted"
    out: dict = {"state": state}
    if state in ("finished", "stopped"):
        out["result"] = (status or {}).get("adapter") or fold.fields.get("result")
    elif state == "failed":
        out["error"] = (status or {}).get("message") or fold.fields.get("error") or "Training failed; see the log."
    return out


def record_snapshot(run: str, run_dir: Path, version: int) -> JobSnapshot:
    """A run as its files left it (no process followed): idle when it never trained."""
    status = read_status(run_dir)
    if status is None:
        return JobSnapshot(version=version, run=run)
    fold = EventFold()
    tail = EventTail(run_dir / EVENTS_FILE)
    fold_events(fold, tail.read())
    state = status["state"]
    if state == "running":                       # a live trainer this service does not follow
        return fold.snapshot(version, "running", run)
    ended = _ended(fold, status)
    if ended["state"] == "interrupted":
        ended["error"] = interrupted_message(run_dir, fold.fields.get("step", 0), None)
    return fold.snapshot(version, run=run, **ended)


def interrupted_message(run_dir: Path, step: int, how: str | None) -> str:
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    where = (f"Resume continues from its newest checkpoint ({ckpts[-1]})" if ckpts
             else "It has no checkpoint yet, so Resume starts it again from step 0")
    return (f"The trainer process ended without finishing ({how or 'it was killed, or the machine stopped'}) "
            f"at step {step}. {where}.")


def _exit_text(code: int | None) -> str | None:
    if code is None:
        return None
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessJob:
    """A trainer child process (``launch``) or a live one found on disk (``attach``), followed by ``poll``: the
    poller thread calls it; ``snapshot`` is safe from any thread. Requests go to ``<run>/control/``; those made
    before the trainer listens (it clears stale ones at start) are made again once it does."""

    def __init__(self, run: str, run_dir: Path, versions: Iterator[int], *, pid: int,
                 proc: subprocess.Popen | None = None, total_steps: int = 0):
        self.run, self.run_dir, self.pid, self._proc = run, Path(run_dir), pid, proc
        self._versions = versions
        self._lock = threading.Lock()            # poll (the poller) and stop/request (pages) both update
        self._tail = EventTail(self.run_dir / EVENTS_FILE)
        self._fold = EventFold()
        self._listening = proc is None           # an attached trainer already listens and records
        self._pending: list[str] = []
        self._stopping = False
        self._ended = False
        self._total = total_steps
        self._launched = 0.0                     # several processes: the launcher's pid is not the trainer's
        self._snap = self._make(starting=True)

    @classmethod
    def launch(cls, run: str, run_dir: Path, versions: Iterator[int], *, config_json: str | None = None,
               total_steps: int = 0, processes: int = 1) -> "ProcessJob":
        """Start training ``run_dir`` with ``config_json`` (written to its config.json), or resume it (None);
        ``processes`` > 1 trains on that many GPUs (``trainer_command``)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        if config_json is None:
            cmd = ["--resume", str(run_dir)]
        else:
            atomic_write_text(run_dir / "config.json", config_json)
            cmd = ["--config", str(run_dir / "config.json"), "--out", str(run_dir)]
        cmd = trainer_command([*cmd, "--quiet"], processes)
        launched = time.time()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(run_dir / LOG_FILE, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        job = cls(run, run_dir, versions, pid=proc.pid, proc=proc, total_steps=total_steps)
        if processes > 1:
            job._launched = launched
        job._fold.log(f"{stamp()} {'resuming' if config_json is None else 'starting'} run '{run}' in a trainer "
                      f"process (pid {proc.pid}; its output goes to {run_dir / LOG_FILE})")
        job._snap = job._make(starting=True)
        return job

    @classmethod
    def attach(cls, run: str, run_dir: Path, versions: Iterator[int], pid: int) -> "ProcessJob":
        """Follow a trainer that is already running (started by an earlier UI), with its whole history."""
        job = cls(run, run_dir, versions, pid=pid)
        job.poll()
        job._fold.log(f"{stamp()} reattached to the trainer process of run '{run}' (pid {pid})")
        job._snap = job._make()
        return job

    def snapshot(self) -> JobSnapshot:
        return self._snap

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return pid_alive(self.pid)

    def poll(self) -> None:
        """Read what the trainer wrote since the last call; notice when its process has gone."""
        if self._ended:
            return
        alive = self.alive()                      # first: whatever it wrote before dying is read below
        if not self._listening:
            status = self._status()
            with self._lock:
                if status is not None and self._ours(status):   # its FileControl listens now
                    self._listening = True
                    for what in self._pending:
                        file_request(self.run_dir, what)
                    self._pending.clear()
        events = self._tail.read() if self._listening else []
        with self._lock:
            fold_events(self._fold, events)
            if not alive:
                self._ended = True
                self._snap = self._finish()
            elif events:
                self._snap = self._make()

    def stop(self) -> bool:
        with self._lock:
            if self._ended or not self._snap.active:
                return False
            self._ask("stop")
            self._stopping = True
            self._fold.log(f"{stamp()} stop requested: the trainer finishes its step, writes a checkpoint and "
                           "the adapter")
            self._snap = self._make()
            return True

    def request(self, what: str) -> bool:
        with self._lock:
            if self._ended or not self._snap.active:
                return False
            self._ask(what)
            return True

    def _ask(self, what: str) -> None:
        file_request(self.run_dir, what)
        if not self._listening:
            self._pending.append(what)

    def _status(self) -> dict | None:
        try:
            status = json.loads((self.run_dir / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def _ours(self, status: dict) -> bool:
        """Whether status.json was written by this job's trainer: its pid, or (several processes, where rank 0
        is a child of the launcher) a status started after the launch."""
        if status.get("pid") == self.pid:
            return True
        try:
            return bool(self._launched) and float(status.get("started") or 0) >= self._launched
        except (TypeError, ValueError):
            return False

    def _make(self, starting: bool = False, **changes) -> JobSnapshot:
        fold = self._fold
        state = changes.pop("state", None) or (
            "starting" if starting or not fold.started else "stopping" if self._stopping else "running")
        changes.setdefault("total_steps", fold.fields.get("total_steps") or self._total)
        return fold.snapshot(next(self._versions), state, self.run, **changes)

    def _finish(self) -> JobSnapshot:
        status = self._status()
        code = self._proc.returncode if self._proc is not None else None
        if status is None or not self._ours(status):       # it died before it began recording
            tail = _log_tail(self.run_dir / LOG_FILE)
            message = (f"The trainer process exited ({_exit_text(code) or 'ended'}) before training began: "
                       f"{tail or 'no output'} (full output: {self.run_dir / LOG_FILE})")
            self._fold.log(f"{stamp()} FAILED: {message}")
            return self._make(state="failed", error=message)
        ended = _ended(self._fold, status)
        if ended["state"] == "interrupted":
            ended["error"] = interrupted_message(self.run_dir, self._fold.fields.get("step", 0), _exit_text(code))
            self._fold.log(f"{stamp()} INTERRUPTED: {ended['error']}")
        return self._fold.snapshot(next(self._versions), run=self.run, **ended)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    body = [line for line in text[-lines:] if line and not line.startswith("=== ")]
    return " / ".join(body)
