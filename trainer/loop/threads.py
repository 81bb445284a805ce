"""CPU threads for torch: one per physical core this process may use (hyper-threads and cores outside its
affinity or container quota are not counted), shared between the training jobs running on the machine.

Two torch processes that each use every core spin-wait on each other's cores and can both run ten times
slower. So every training process registers itself (a pid file under the temp folder) and uses
``cores // jobs`` threads; a running job re-checks between steps and gives threads up when another starts
(and takes them back when it ends). An explicit ``cpu_threads`` (``--threads N``) is used as given.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch

from .records import process_exists

__all__ = ["physical_cores", "ThreadShare", "configure_threads", "JOBS_DIR"]
JOBS_DIR = Path(tempfile.gettempdir()) / "lora-trainer-jobs"


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, one per set of hyper-thread siblings,
    capped by a cgroup CPU quota (containers)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    n = max(1, len(cores))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def _live_jobs(folder: Path) -> list[int]:
    """Pids of the registered training processes that still run; stale files are removed."""
    pids = []
    for f in folder.glob("*.pid") if folder.is_dir() else []:
        try:
            pid = int(f.stem)
        except ValueError:
            continue
        if process_exists(pid):
            pids.append(pid)
        else:
            f.unlink(missing_ok=True)
    return pids


class ThreadShare:
    """This process's share of the cores, kept up to date with the other training jobs (``refresh``)."""

    def __init__(self, requested: int = 0, *, register: bool = True, folder: Path = JOBS_DIR, every_s: float = 5.0):
        self.requested, self.folder, self.every_s = requested, folder, every_s
        self.cores = physical_cores()
        self.file: Path | None = None
        if register and requested <= 0:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.file = folder / f"{os.getpid()}.pid"
                self.file.write_text(str(os.getpid()))
            except OSError:       # a read-only temp folder: no sharing, still a valid thread count
                self.file = None
        self.threads, self.others, self._checked = 0, 0, 0.0
        self._apply()

    def _apply(self) -> bool:
        if self.requested > 0:
            threads, others = self.requested, 0
        else:
            others = len([p for p in _live_jobs(self.folder) if p != os.getpid()])
            threads = max(1, self.cores // (others + 1))
        self._checked = time.monotonic()
        changed = threads != self.threads
        self.threads, self.others = threads, others
        if changed:
            torch.set_num_threads(threads)
        return changed

    def describe(self) -> str:
        if self.requested > 0:
            return f"cpu threads: {self.threads} (set by cpu_threads; {self.cores} physical core(s))"
        jobs = f"{self.others} other training job(s) running" if self.others else "no other training job running"
        return f"cpu threads: {self.threads} ({self.cores} physical core(s), {jobs})"

    def refresh(self) -> str | None:
        """Re-check the other jobs (at most every ``every_s`` seconds); a line to log when the count changed."""
        if self.requested > 0 or time.monotonic() - self._checked < self.every_s:
            return None
        return self.describe() if self._apply() else None

    def close(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
            self.file = None


def configure_threads(requested: int = 0, *, register: bool = False) -> ThreadShare:
    """Set torch's threads for this process now (see ThreadShare)."""
    return ThreadShare(requested, register=register)
