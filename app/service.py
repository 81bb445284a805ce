"""The web UI's one door into ``trainer``: ``Service`` composes run folders and datasets (app/runs.py), the
form <-> TrainConfig mapping and presets (app/settings.py), cached renderers for preview and blend
(app/rendering.py) and adapters and export (app/exporting.py), and owns the background training job.

Everything the UI shows comes from here as plain Python values; failures are ``TrainerError``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from trainer import config as tconfig
from trainer.errors import ConfigError, TrainerError
from trainer.events import Control

from app.exporting import ExportMixin
from app.jobs import JobBusy, JobManager, JobSnapshot
from app.rendering import RenderMixin, _Cached
from app.runs import BUILTIN_MODEL_DIR, IMAGE_EXTENSIONS, RunsMixin
from app.settings import FieldSpec, SettingsMixin, config_fields

__all__ = ["Service", "JobManager", "JobSnapshot", "FieldSpec", "TrainerError", "ConfigError", "config_fields",
           "IMAGE_EXTENSIONS", "BUILTIN_MODEL_DIR"]


class Service(RunsMixin, SettingsMixin, RenderMixin, ExportMixin):
    """All app state that outlives a page: the outputs folder, the job, loaded models. Each concern lives in
    its mixin; ``__init__`` sets the state they share. The job lives here: ``jobs`` (a JobManager running
    ``train_fn``, by default the real trainer) and ``start_training``, which checks the form and the dataset."""

    def __init__(self, outputs_dir: str | Path = "outputs", default_model: str = "builtin",
                 presets_dir: str | Path | None = None, train_fn: Callable | None = None,
                 renderer_factory: Callable[[str], Any] | None = None):
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.default_model = default_model
        self.presets_dir = Path(presets_dir) if presets_dir else tconfig.PRESETS_DIR
        self.jobs = JobManager(train_fn or _train, Control, user_errors=(TrainerError,))
        self._renderer_factory = renderer_factory
        self._renderers: dict[str, _Cached] = {}
        self._render_lock = threading.Lock()
        self.model_loads = 0

    def warm_up(self) -> None:
        """Import the trainer's heavy modules (torch, diffusers) now, so the first click is not slow.
        Call it from a background thread after the page is up."""
        import trainer.data.scan  # noqa: F401
        import trainer.render.generate  # noqa: F401
        import trainer.loop.train  # noqa: F401

    # -- training ---------------------------------------------------------------------------
    def start_training(self, run: str, values: dict[str, Any]) -> "tconfig.TrainConfig":
        config = self.build_config(run, values)
        if not self.dataset_items(run):
            raise TrainerError(f"Run '{run}' has no images yet; add some on the Dataset tab first.",
                               field="data_dir")
        try:
            self.jobs.start(run, config)
        except JobBusy as err:
            raise TrainerError(str(err), field="start") from None
        return config


def _train(config: "tconfig.TrainConfig", **kwargs: Any) -> Path:
    from trainer.loop.train import train  # imported on first use: it brings torch and diffusers

    return train(config, **kwargs)
