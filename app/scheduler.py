"""One training run at a time and the runs waiting for it: ``JobQueue`` holds the current job (a trainer
process, or the in-thread test seam), the queue (also kept in ``<outputs>/.queue.json``, so a UI restart keeps
it) and the poller thread that follows the current job and starts the next one when it ends.

Trainer-agnostic: the service passes ``launch(entry, versions)``, which turns a queue entry into a job.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from app.jobs import DoneJob, JobSnapshot, stamp, version_counter

QUEUE_FILE = ".queue.json"
log = logging.getLogger(__name__)


class JobBusy(Exception):
    """A run was asked to start or queue while it already trains or waits."""


class Job(Protocol):
    run: str

    def snapshot(self) -> JobSnapshot: ...
    def poll(self) -> None: ...
    def stop(self) -> bool: ...
    def request(self, what: str) -> bool: ...


@dataclass(frozen=True)
class Queued:
    """A run waiting to train: ``kind`` "train" with ``config`` (the resolved TrainConfig as a dict), or
    "resume" (the run's own config.json and newest checkpoint); ``processes``: GPUs it trains on."""

    run: str
    kind: str = "train"
    config: dict | None = None
    queued: float = 0.0
    processes: int = 1


@dataclass(frozen=True)
class Overview:
    """The current job (or the last one, or idle), the queue and notes about it, for any page."""

    version: int
    current: JobSnapshot
    queue: tuple[Queued, ...] = ()
    notes: tuple[str, ...] = ()

    def ahead(self, run: str) -> int | None:
        """How many runs train before ``run`` (the current one included); None when it is not queued."""
        names = [q.run for q in self.queue]
        if run not in names:
            return None
        return names.index(run) + (1 if self.current.active else 0)


class JobQueue:
    """The service's jobs: ``submit`` starts a run now or queues it, ``remove`` takes it off the queue,
    ``stop``/``request`` reach the current job. The poller (a daemon thread, alive only while a job runs or the
    queue waits) polls the current job every ``interval`` seconds and starts the next entry when it ends."""

    def __init__(self, outputs: Path, launch: Callable[[Queued, Iterator[int]], Job], *, interval: float = 0.25):
        self.outputs = Path(outputs)
        self.versions = version_counter()
        self._launch = launch
        self.interval = interval
        self._lock = threading.RLock()
        self._job: Job | None = None
        self._idle = JobSnapshot(version=next(self.versions))
        self._last: dict[str, JobSnapshot] = {}          # run -> its job's final snapshot
        self._notes: deque[str] = deque(maxlen=20)
        self._queue: list[Queued] = []
        self._queue_version = next(self.versions)
        self._queue, dropped = self._load()
        if dropped:
            self._changed()
        self._holding = False
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()

    # -- what pages read ------------------------------------------------------------------------
    def snapshot(self) -> JobSnapshot:
        """The current job's snapshot (the last job's once it ended; idle before any)."""
        with self._lock:
            return self._job.snapshot() if self._job is not None else self._idle

    def overview(self) -> Overview:
        with self._lock:
            current = self.snapshot()
            return Overview(max(current.version, self._queue_version), current, tuple(self._queue),
                            tuple(self._notes))

    def last(self, run: str) -> JobSnapshot | None:
        """The snapshot of ``run``'s job in this process, current or ended, if it had one."""
        with self._lock:
            if self._job is not None and self._job.run == run:
                return self._job.snapshot()
            return self._last.get(run)

    def queued(self) -> list[Queued]:
        with self._lock:
            return list(self._queue)

    def position(self, run: str) -> int | None:
        return self.overview().ahead(run)

    # -- what pages ask -------------------------------------------------------------------------
    def submit(self, entry: Queued) -> int | None:
        """Start ``entry`` now when nothing trains (None), else queue it and return how many runs are ahead.
        JobBusy when the run already trains or waits."""
        entry = dataclasses.replace(entry, queued=entry.queued or round(time.time(), 3))
        with self._lock:
            current = self.snapshot()
            if current.active and current.run == entry.run:
                raise JobBusy(f"Run '{entry.run}' is already training (step {current.step}/"
                              f"{current.total_steps or '?'}); stop it first, or wait for it to finish.")
            if any(q.run == entry.run for q in self._queue):
                raise JobBusy(f"Run '{entry.run}' is already queued ({self.position(entry.run)} ahead); remove it "
                              "from the queue first to queue it with new settings.")
            self._queue.append(entry)
            self._changed()
            self._advance()
            self._ensure_poller()
            return self.position(entry.run)

    def remove(self, run: str) -> bool:
        """Take ``run`` off the queue; False when it is not queued."""
        with self._lock:
            kept = [q for q in self._queue if q.run != run]
            if len(kept) == len(self._queue):
                return False
            self._queue = kept
            self._changed()
            return True

    def attach(self, job: Job) -> None:
        """Make ``job`` (a live trainer found on disk) the current job, when nothing else runs."""
        with self._lock:
            if self._job is not None and self._job.snapshot().active:
                raise JobBusy(f"Run '{self._job.run}' is the current job; cannot attach '{job.run}'.")
            self._set_current(job)
            self._ensure_poller()

    def start_polling(self) -> None:
        """Follow the current job and work through the queue (after a restart: what the files held)."""
        with self._lock:
            self._advance()
            self._ensure_poller()

    def stop(self) -> bool:
        """Ask the current job to stop after its step (it still saves); False when none runs."""
        with self._lock:
            job = self._job
        return job is not None and job.stop()

    def request(self, what: str) -> bool:
        """'sample' or 'save' now in the current job; False when none runs."""
        with self._lock:
            job = self._job
        return job is not None and job.request(what)

    def wait(self, timeout: float | None = None, run: str | None = None) -> JobSnapshot:
        """Wait until ``run`` (default: the current job's) neither trains nor waits; its last snapshot."""
        end = None if timeout is None else time.monotonic() + timeout
        target = run or self.snapshot().run
        while True:
            with self._lock:
                snap = self.last(target) or self._idle
                waiting = snap.active or any(q.run == target for q in self._queue)
            if not waiting or (end is not None and time.monotonic() >= end):
                return snap
            time.sleep(0.05)

    def shutdown(self, timeout: float) -> JobSnapshot | None:
        """Start nothing more; ask the current job to stop and wait up to ``timeout`` s for it. Its snapshot
        (still active when it did not end in time), or None when nothing ran. The queue stays on disk."""
        with self._lock:
            self._holding = True
            job = self._job
        if job is None or not job.snapshot().active:
            return None
        job.stop()
        return self.wait(timeout, job.run)

    def close(self) -> None:
        """Stop the poller (the job itself keeps running: a trainer process outlives the UI)."""
        self._closing.set()
        poller = self._poller
        if poller is not None:
            poller.join(5)

    # -- the poller -----------------------------------------------------------------------------
    def _busy(self) -> bool:  # caller holds the lock
        return (self._job is not None and self._job.snapshot().active) or (bool(self._queue) and not self._holding)

    def _ensure_poller(self) -> None:  # caller holds the lock
        if self._busy() and (self._poller is None or not self._poller.is_alive()) and not self._closing.is_set():
            self._poller = threading.Thread(target=self._poll_loop, name="job-poller", daemon=True)
            self._poller.start()

    def _poll_loop(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                job = self._job
            if job is not None:
                job.poll()                 # file reads, outside the lock
            with self._lock:
                self._advance()
                if not self._busy():
                    self._poller = None
                    return
            self._closing.wait(self.interval)

    def _advance(self) -> None:  # caller holds the lock
        """Start the first queued run when nothing trains."""
        if self._holding or not self._queue or (self._job is not None and self._job.snapshot().active):
            return
        entry = self._queue.pop(0)
        self._changed()
        try:
            job = self._launch(entry, self.versions)
        except Exception as err:  # noqa: BLE001 - the run shows as failed with this message instead of starting
            message = f"Run '{entry.run}' could not start: {err}"
            log.warning(message)
            job = DoneJob(JobSnapshot(version=next(self.versions), state="failed", run=entry.run, error=message,
                                      logs=(f"{stamp()} FAILED: {message}",)))
        self._set_current(job)

    def _set_current(self, job: Job) -> None:  # caller holds the lock
        if self._job is not None:
            self._last[self._job.run] = self._job.snapshot()
        self._job = job

    # -- the queue file -------------------------------------------------------------------------
    def _changed(self) -> None:  # caller holds the lock
        self._queue_version = next(self.versions)
        path = self.outputs / QUEUE_FILE
        data = {"version": 1, "queue": [dataclasses.asdict(q) for q in self._queue]}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            self._note(f"could not save the queue to {path} ({err}); it is kept in memory only")

    def _load(self) -> tuple[list[Queued], bool]:
        """The saved queue, less the runs whose folder is gone (and whether any was)."""
        path = self.outputs / QUEUE_FILE
        if not path.is_file():
            return [], False
        try:
            items: list[Any] = json.loads(path.read_text(encoding="utf-8"))["queue"]
            entries = [Queued(**{k: v for k, v in item.items() if k in Queued.__dataclass_fields__})
                       for item in items]
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._note(f"ignored the queue file {path}: it cannot be read ({err})")
            return [], False
        kept = []
        for entry in entries:
            if (self.outputs / entry.run).is_dir():
                kept.append(entry)
            else:
                self._note(f"dropped queued run '{entry.run}': its folder {self.outputs / entry.run} is gone")
        return kept, len(kept) < len(entries)

    def _note(self, text: str) -> None:
        log.warning(text)
        self._notes.append(f"{stamp()} {text}")
