"""The web UI's one door into ``trainer``: ``Service`` composes run folders and datasets (app/runs.py), the
form <-> TrainConfig mapping and presets (app/settings.py), cached renderers for preview and blend
(app/rendering.py) and adapters and export (app/exporting.py), and owns the training jobs (app/scheduler.py:
one at a time, a queue; app/runner.py: each run a trainer process).

Everything the UI shows comes from here as plain Python values; failures are ``TrainerError``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from trainer import config as tconfig
from trainer.errors import ConfigError, TrainerError
from trainer.events import Control

from app.exporting import ExportMixin
from app.jobs import JobSnapshot, ThreadJob
from app.preflight import PreflightMixin
from app.rendering import RenderMixin, _Cached
from app.runner import ProcessJob, file_request, read_status, record_snapshot, visible_gpus
from app.runs import BUILTIN_MODEL_DIR, IMAGE_EXTENSIONS, RunsMixin
from app.scheduler import JobBusy, JobQueue, Overview, Queued
from app.settings import FieldSpec, SettingsMixin, config_fields

__all__ = ["Service", "JobSnapshot", "Overview", "FieldSpec", "TrainerError", "ConfigError", "config_fields",
           "IMAGE_EXTENSIONS", "BUILTIN_MODEL_DIR"]


class Service(RunsMixin, SettingsMixin, RenderMixin, ExportMixin, PreflightMixin):
    """All app state that outlives a page: the outputs folder, the jobs, loaded models. Each concern lives in
    its mixin; ``__init__`` sets the state they share. ``jobs`` (a JobQueue) runs each training as a trainer
    process, or with ``train_fn`` (tests) in a thread of this one; on start it reattaches to a run still
    training from an earlier UI and picks up the saved queue."""

    def __init__(self, outputs_dir: str | Path = "outputs", default_model: str = "builtin",
                 presets_dir: str | Path | None = None, train_fn: Callable | None = None,
                 renderer_factory: Callable[[str], Any] | None = None):
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.default_model = default_model
        self.presets_dir = Path(presets_dir) if presets_dir else tconfig.PRESETS_DIR
        self._train_fn = train_fn
        self.jobs = JobQueue(self.outputs, self._launch)
        self._records: dict[str, tuple[tuple, JobSnapshot]] = {}
        self._renderer_factory = renderer_factory
        self._renderers: dict[str, _Cached] = {}
        self._render_lock = threading.Lock()
        self.model_loads = 0
        self._gpus: int | None = None                # visible CUDA GPUs, counted when first asked
        self.reattached: str | None = None           # the run found still training at start, if any
        self._reattach()
        self.jobs.start_polling()

    def warm_up(self) -> None:
        """Import the trainer's heavy modules (torch, diffusers) now, so the first click is not slow.
        Call it from a background thread after the page is up."""
        import trainer.data.scan  # noqa: F401
        import trainer.render.generate  # noqa: F401
        import trainer.loop.train  # noqa: F401

    # -- training ---------------------------------------------------------------------------
    def gpu_count(self) -> int:
        """CUDA GPUs a run can train on (torch is imported on the first call, not before)."""
        if self._gpus is None:
            self._gpus = visible_gpus()
        return self._gpus

    def _processes(self, gpus: Any) -> int:
        """``gpus`` checked against what is visible: 1..gpu_count()."""
        try:
            n = int(gpus or 1)
        except (TypeError, ValueError):
            n = 0
        if n == 1:
            return 1
        count = self.gpu_count()
        if not 1 <= n <= max(count, 1) or n != float(gpus):
            raise TrainerError(f"GPUs {gpus!r} is not usable: this machine has {count} CUDA GPU(s); pick 1 to "
                               f"{max(count, 1)}.", field="gpus")
        return n

    def start_training(self, run: str, values: dict[str, Any], gpus: int = 1) -> "tconfig.TrainConfig":
        """Train ``run`` with the form ``values`` on ``gpus`` GPUs now, or queue it behind the current run
        (``jobs.position(run)`` says how many are ahead)."""
        processes = self._processes(gpus)
        config = self.build_config(run, values)
        if not self.dataset_items(run):
            raise TrainerError(f"Run '{run}' has no images yet; add some on the Dataset tab first.",
                               field="data_dir")
        self._refuse_if_trained_elsewhere(run)
        self._submit(Queued(run, "train", config.to_dict(), processes=processes))
        return config

    def stop(self, run: str = "") -> bool:
        """Ask ``run`` (default: the current job) to stop after its step; it still writes a checkpoint and the
        adapter. Also reaches a trainer another UI started. False when it is not training."""
        current = self.jobs.snapshot()
        if not run or run == current.run:
            return self.jobs.stop()
        run_dir = self.run_dir(run)
        if (read_status(run_dir) or {}).get("state") != "running":
            return False
        file_request(run_dir, "stop")
        return True

    def _refuse_if_trained_elsewhere(self, run: str) -> None:
        status = read_status(self.run_dir(run)) or {}
        current = self.jobs.snapshot()
        if status.get("state") == "running" and not (current.active and current.run == run):
            raise TrainerError(f"Run '{run}' is being trained by another trainer process (pid {status.get('pid')}); "
                               "stop it or wait for it to finish.", field="start")

    def resume(self, run: str, gpus: int = 1) -> None:
        """Continue a stopped or interrupted run from its newest checkpoint (on ``gpus`` GPUs), now or after
        the queue."""
        processes = self._processes(gpus)
        run_dir = self.run_dir(run)
        if not (run_dir / "config.json").is_file():
            raise TrainerError(f"Run '{run}' has never trained (no config.json in {run_dir}); press Start "
                               "training instead.", field="resume")
        status = read_status(run_dir) or {}
        if status.get("state") == "finished":
            raise TrainerError(f"Run '{run}' already finished all its {status.get('total_steps') or ''} steps; "
                               "to train longer, raise Steps and press Start training.", field="resume")
        self._refuse_if_trained_elsewhere(run)
        self._submit(Queued(run, "resume", processes=processes))

    def _submit(self, entry: Queued) -> None:
        try:
            self.jobs.submit(entry)
        except JobBusy as err:
            raise TrainerError(str(err), field="start") from None

    def _launch(self, entry: Queued, versions: Iterator[int]):
        """A queue entry -> its job: a trainer process, or (``train_fn``) a thread of this process."""
        run_dir = self.run_dir(entry.run)
        resume = entry.kind == "resume"
        if resume:
            config = tconfig.from_dict(_read_json(run_dir / "config.json"))
        else:
            config = tconfig.from_dict(entry.config or {}).replace(output_dir=str(run_dir))
        if self._train_fn is not None:
            return ThreadJob(entry.run, config, self._train_fn, Control, versions, user_errors=(TrainerError,),
                             resume=str(run_dir) if resume else None)
        return ProcessJob.launch(entry.run, run_dir, versions, total_steps=config.max_train_steps,
                                 config_json=None if resume else config.to_json() + "\n",
                                 processes=entry.processes)

    def _reattach(self) -> None:
        """The newest run whose trainer still runs (started by an earlier UI) becomes the current job."""
        live = []
        for folder in self.outputs.iterdir():
            if folder.is_dir() and folder.name[0] not in "._":
                status = read_status(folder)
                if status and status.get("state") == "running":
                    live.append((status.get("started") or 0, folder.name, status["pid"]))
        if live:
            _, run, pid = max(live)
            self.jobs.attach(ProcessJob.attach(run, self.outputs / run, self.jobs.versions, pid))
            self.reattached = run

    def job_view(self, run: str) -> tuple[JobSnapshot, Overview]:
        """What the Train tab shows for the picked ``run``: its job when it is the current or an earlier one of
        this UI; the current job while ``run`` waits in the queue or has no record; else what its files say
        (finished, stopped, interrupted...). With the overview (current job, queue) beside it."""
        overview = self.jobs.overview()
        current, name = overview.current, (run or "").strip()
        if not name or name == current.run:
            return current, overview
        own = self.jobs.last(name)
        if own is not None:
            return own, overview
        if overview.ahead(name) is None:
            record = self._record(name)
            if record is not None and record.state != "idle":
                return record, overview
        return (current if current.active else JobSnapshot(version=0, run=name)), overview

    def _record(self, run: str) -> JobSnapshot | None:
        """A run's record snapshot, rebuilt only when its files (or its process) changed."""
        try:
            run_dir = self.run_dir(run)
        except TrainerError:
            return None
        status = read_status(run_dir)
        if status is None:
            return None
        stats = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
                      for p in (run_dir / "events.jsonl", run_dir / "status.json"))
        key = (stats, status.get("state"))
        cached = self._records.get(run)
        if cached is None or cached[0] != key:
            cached = (key, record_snapshot(run, run_dir, next(self.jobs.versions)))
            self._records[run] = cached
        return cached[1]


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TrainerError(f"'{path}' cannot be read ({err}); start the run again instead.", field="resume") from None
