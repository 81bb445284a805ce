"""Typed events the training loop emits, and the control object it reads each step.

Front ends (console, web UI) subscribe with a callback; they ask for stop / save-now /
sample-now through ``Control``. Nothing here knows about any UI.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass(frozen=True)
class Started:
    run_dir: str
    total_steps: int
    trainable_params: int
    num_images: int


@dataclass(frozen=True)
class Progress:
    step: int                 # optimizer steps done
    total_steps: int
    epoch: int
    loss: float               # loss of this step (mean over accumulated micro-batches)
    avg_loss: float           # running mean over the last window of steps
    lr: float
    it_per_s: float | None    # smoothed (trainer/loop/pace.py); None over the first steps, not measured yet
    eta_s: float | None       # seconds left at that speed; None while it_per_s is


@dataclass(frozen=True)
class Validation:
    step: int                 # optimizer steps done when evaluated (0 = the base model)
    loss: float               # mean MSE on the held-out images at fixed timesteps and noise
    images: int


@dataclass(frozen=True)
class Sample:
    step: int
    paths: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Saved:
    step: int
    path: str
    final: bool


@dataclass(frozen=True)
class Log:
    message: str


@dataclass(frozen=True)
class Finished:
    path: str                 # the final adapter file
    steps: int
    stopped_early: bool
    final_loss: float
    seconds: float


@dataclass(frozen=True)
class Effect:
    verdict: str              # strong / weak / none / overbaked / unknown (render.effect)
    line: str                 # "strong (0.71 at 1.0 vs 0.02 at 0)"
    advice: str
    path: str                 # effect.json
    grid: str | None          # effect.png, None when the check failed


@dataclass(frozen=True)
class Failed:
    message: str              # a user-facing message (TrainerError text, or a summary)
    step: int


Event = Union[Started, Progress, Validation, Sample, Saved, Log, Effect, Finished, Failed]
Listener = Callable[[Event], None]


@dataclass
class Control:
    """Requests from a front end to a running loop; thread-safe flags checked each step."""

    _stop: threading.Event = field(default_factory=threading.Event)
    _save: threading.Event = field(default_factory=threading.Event)
    _sample: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self._stop.set()

    def save_now(self) -> None:
        self._save.set()

    def sample_now(self) -> None:
        self._sample.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def take_save(self) -> bool:
        """True once per save request."""
        if self._save.is_set():
            self._save.clear()
            return True
        return False

    def take_sample(self) -> bool:
        if self._sample.is_set():
            self._sample.clear()
            return True
        return False
