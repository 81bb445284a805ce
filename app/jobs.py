"""The background training job: one worker thread at a time, and the latest of its events (progress
history, logs, samples, result or failure) as an immutable snapshot any page can poll to reattach.

Trainer-agnostic: ``app.service`` passes the train function, the control factory and the error type
whose messages are meant for people. Events are the trainer's typed dataclasses, dispatched by class name.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class JobBusy(Exception):
    """A second job was asked for while one runs."""


@dataclass(frozen=True)
class JobSnapshot:
    """What a page needs to draw the job; ``version`` changes whenever anything else does."""

    version: int = 0
    state: str = "idle"             # idle / starting / running / stopping / finished / stopped / failed
    run: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    history: tuple[tuple[int, float, float], ...] = ()     # (step, loss, avg_loss)
    validation: tuple[tuple[int, float], ...] = ()         # (step, validation loss)
    logs: tuple[str, ...] = ()
    samples: tuple[tuple[str, str], ...] = ()              # (image path, caption)
    result: str | None = None
    error: str | None = None
    seconds: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


class JobManager:
    """One background training thread at a time, and the latest of its events for any page to poll.

    ``train_fn(config, listeners=[...], control=...)`` runs the training synchronously (in the worker) and
    returns the adapter path; ``make_control()`` builds the object it reads stop/save/sample requests from;
    exceptions of type ``user_errors`` carry messages meant for people, anything else is reported with its
    type and a traceback in the log.
    """

    def __init__(self, train_fn: Callable[..., Any], make_control: Callable[[], Any],
                 user_errors: tuple[type[BaseException], ...] = (), log_limit: int = 400):
        self._train_fn = train_fn
        self._make_control = make_control
        self._user_errors = user_errors
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._control: Any = None
        self._snap = JobSnapshot()
        self._history: list[tuple[int, float, float]] = []
        self._validation: list[tuple[int, float]] = []
        self._logs: deque[str] = deque(maxlen=log_limit)
        self._samples: list[tuple[str, str]] = []

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self._snap

    def start(self, run: str, config: Any) -> None:
        """Train ``config`` (a TrainConfig) in a new worker thread; JobBusy while another job runs."""
        with self._lock:
            if self._snap.active:
                s = self._snap
                raise JobBusy(f"A training run ('{s.run}', step {s.step}/{s.total_steps or '?'}) is already in "
                              "progress; stop it or wait for it to finish. One run at a time.")
            self._control = self._make_control()
            self._history, self._samples, self._validation = [], [], []
            self._logs.clear()
            self._logs.append(f"{time.strftime('%H:%M:%S')} starting run '{run}' -> {config.output_dir}")
            self._snap = JobSnapshot(version=self._snap.version + 1, state="starting", run=run,
                                     total_steps=config.max_train_steps, logs=tuple(self._logs))
            self._thread = threading.Thread(target=self._work, args=(config, self._control),
                                            name=f"train-{run}", daemon=True)
            self._thread.start()

    def stop(self) -> bool:
        """Ask the running job to stop after its current step (it still saves); False when none runs."""
        with self._lock:
            if not self._snap.active or self._control is None:
                return False
            self._control.stop()
            self._logs.append("stop requested: finishing the current step, then saving the adapter")
            self._update(state="stopping")
            return True

    def request(self, what: str) -> bool:
        """'sample' or 'save' now; False when no job runs."""
        with self._lock:
            if not self._snap.active or self._control is None:
                return False
            (self._control.sample_now if what == "sample" else self._control.save_now)()
            return True

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()

    # -- worker side -----------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:  # caller holds the lock
        self._snap = dataclasses.replace(self._snap, version=self._snap.version + 1, history=tuple(self._history),
                                         validation=tuple(self._validation),
                                         logs=tuple(self._logs), samples=tuple(self._samples), **changes)

    def _running(self) -> str:
        return "stopping" if self._snap.state == "stopping" else "running"

    def on_event(self, event: Any) -> None:
        """The listener given to the trainer: one handler per event class (Started, Progress, ...)."""
        handler = getattr(self, f"_on_{type(event).__name__.lower()}", None)
        if handler is not None:
            with self._lock:
                handler(event, time.strftime("%H:%M:%S"))

    def _on_progress(self, e: Any, stamp: str) -> None:
        self._history.append((e.step, e.loss, e.avg_loss))
        self._update(state=self._running(), step=e.step, total_steps=e.total_steps, epoch=e.epoch, loss=e.loss,
                     avg_loss=e.avg_loss, lr=e.lr, it_per_s=e.it_per_s, eta_s=e.eta_s)

    def _on_validation(self, e: Any, stamp: str) -> None:
        self._validation.append((e.step, e.loss))
        self._logs.append(f"{stamp} validation loss {e.loss:.4f} at step {e.step} ({e.images} held-out images)")
        self._update()

    def _on_started(self, e: Any, stamp: str) -> None:
        self._logs.append(f"{stamp} training {e.total_steps} steps on {e.num_images} images, "
                          f"{e.trainable_params:,} trainable parameters")
        self._update(state=self._running(), total_steps=e.total_steps)

    def _on_log(self, e: Any, stamp: str) -> None:
        self._logs.append(f"{stamp} {e.message}")
        self._update()

    def _on_sample(self, e: Any, stamp: str) -> None:
        self._samples.extend((p, f"step {e.step}: {prompt}") for p, prompt in zip(e.paths, e.prompts))
        self._logs.append(f"{stamp} {len(e.paths)} sample image(s) at step {e.step}")
        self._update()

    def _on_saved(self, e: Any, stamp: str) -> None:
        self._logs.append(f"{stamp} saved {'adapter' if e.final else 'checkpoint'} at step {e.step}: {e.path}")
        self._update()

    def _on_finished(self, e: Any, stamp: str) -> None:
        how = "stopped early" if e.stopped_early else "finished"
        self._logs.append(f"{stamp} {how} after {e.steps} steps in {e.seconds:.1f}s; adapter: {e.path}")
        self._update(state="stopped" if e.stopped_early else "finished", result=e.path, step=e.steps,
                     seconds=e.seconds)

    def _on_failed(self, e: Any, stamp: str) -> None:
        self._logs.append(f"{stamp} FAILED: {e.message}")
        self._update(state="failed", error=e.message)

    def _work(self, config: Any, control: Any) -> None:
        path = None
        try:
            path = self._train_fn(config, listeners=[self.on_event], control=control)
        except self._user_errors as err:
            self._fail(str(err))
        except Exception as err:  # noqa: BLE001 - shown to the user; the traceback goes to the log panel
            with self._lock:
                self._logs.extend(traceback.format_exc().rstrip().splitlines()[-12:])
            self._fail(f"Training stopped by an unexpected error: {type(err).__name__}: {err}")
        else:
            with self._lock:
                done = self._snap.state in ("finished", "stopped")
            if not done or not path or not Path(path).is_file():
                self._fail(f"Training ended without writing an adapter (expected {path or 'a file'}); "
                           "see the log above.")

    def _fail(self, message: str) -> None:
        with self._lock:
            if self._snap.state != "failed":  # a Failed event may already have said it
                self._logs.append(f"FAILED: {message}")
                self._update(state="failed", error=message)
