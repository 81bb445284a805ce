"""A training job as pages see it: ``JobSnapshot`` (immutable; progress history, logs, samples, result or
failure), ``EventFold`` (training events -> snapshot fields, from live typed events or from the dicts a run's
events.jsonl holds) and ``ThreadJob``, the in-process runner kept as a test seam (``Service(train_fn=...)``).

Trainer-agnostic: events are dispatched by class name; ``app.service`` passes the train function, the control
factory and the error type whose messages are meant for people. The process runner is ``app/runner.py``.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ACTIVE_STATES = ("starting", "running", "stopping")


class Prefix(Sequence):
    """The first ``n`` items of an append-only list, as an immutable sequence: a snapshot takes one in O(1)
    instead of copying the whole history on every update. The list is only ever appended to (a resume that goes
    back starts a new list), so an older snapshot's prefix never changes. Compares equal to a tuple of the same
    items."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list | None = None, n: int | None = None):
        self._items = items if items is not None else []
        self._n = len(self._items) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self._items[:self._n][i])
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("index out of range")
        return self._items[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(other) == self._n and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Prefix({list(self)!r})"


@dataclass(frozen=True)
class JobSnapshot:
    """What a page needs to draw a job; ``version`` comes from one counter per service, so a new value means
    something changed (and snapshots of different jobs never share one)."""

    version: int = 0
    state: str = "idle"     # idle / starting / running / stopping / finished / stopped / failed / interrupted
    run: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    history: Sequence[tuple[int, float, float]] = ()       # (step, loss, avg_loss); a Prefix, not copied
    validation: Sequence[tuple[int, float]] = ()           # (step, validation loss)
    logs: tuple[str, ...] = ()                             # the last 400 lines
    samples: Sequence[tuple[str, str]] = ()                # (image path, caption)
    result: str | None = None
    error: str | None = None                               # why it failed, or how it was interrupted
    seconds: float | None = None
    effect: tuple[tuple[str, str], ...] = ()               # the effect check's verdict, line, advice, path, grid

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def resumable(self) -> bool:
        """Stopped early or interrupted: ``python -m trainer train --resume`` continues it."""
        return self.state in ("stopped", "interrupted")


def stamp(when: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


class EventFold:
    """Training events folded into snapshot fields. ``add(kind, e, when)``: ``kind`` is the event's class name,
    ``e`` anything with its fields as attributes (the dataclass, or a namespace of an events.jsonl line),
    ``when`` the time to show. ``outcome`` is finished / stopped / failed once the events say so (a later
    Started, a resume, clears it); a step that goes back (a resume from an earlier checkpoint) drops the
    history after it, so the chart shows one line."""

    def __init__(self, log_limit: int = 400):
        self.history: list[tuple[int, float, float]] = []
        self.validation: list[tuple[int, float]] = []
        self.logs: deque[str] = deque(maxlen=log_limit)
        self.samples: list[tuple[str, str]] = []
        self.fields: dict[str, Any] = {}
        self.started = False
        self.outcome: str | None = None

    def add(self, kind: str, e: Any, when: float | None = None) -> None:
        handler = getattr(self, f"_on_{kind.lower()}", None)
        if handler is not None:
            handler(e, stamp(when))

    def log(self, line: str) -> None:
        self.logs.append(line)

    def snapshot(self, version: int, state: str, run: str, **changes: Any) -> JobSnapshot:
        values = {**self.fields, **changes}
        return JobSnapshot(version=version, state=state, run=run, history=Prefix(self.history),
                           validation=Prefix(self.validation), logs=tuple(self.logs),
                           samples=Prefix(self.samples), **values)

    def _on_progress(self, e: Any, when: str) -> None:
        if self.history and e.step <= self.history[-1][0]:      # resumed from an earlier checkpoint
            self.history = [h for h in self.history if h[0] < e.step]
            self.validation = [v for v in self.validation if v[0] < e.step]
        self.history.append((e.step, e.loss, e.avg_loss))
        self.fields.update(step=e.step, total_steps=e.total_steps, epoch=e.epoch, loss=e.loss, avg_loss=e.avg_loss,
                           lr=e.lr, it_per_s=e.it_per_s, eta_s=e.eta_s)

    def _on_validation(self, e: Any, when: str) -> None:
        self.validation.append((e.step, e.loss))
        self.logs.append(f"{when} validation loss {e.loss:.4f} at step {e.step} ({e.images} held-out images)")

    def _on_started(self, e: Any, when: str) -> None:
        self.started, self.outcome = True, None
        self.fields.update(total_steps=e.total_steps, result=None, error=None, seconds=None, effect=())
        self.logs.append(f"{when} training {e.total_steps} steps on {e.num_images} images, "
                         f"{e.trainable_params:,} trainable parameters")

    def _on_log(self, e: Any, when: str) -> None:
        self.logs.append(f"{when} {e.message}")

    def _on_sample(self, e: Any, when: str) -> None:
        self.samples.extend((p, f"step {e.step}: {prompt}") for p, prompt in zip(e.paths, e.prompts))
        self.logs.append(f"{when} {len(e.paths)} sample image(s) at step {e.step}")

    def _on_saved(self, e: Any, when: str) -> None:
        self.logs.append(f"{when} saved {'adapter' if e.final else 'checkpoint'} at step {e.step}: {e.path}")

    def _on_effect(self, e: Any, when: str) -> None:
        self.logs.append(f"{when} effect check: {e.line}")
        self.fields["effect"] = tuple((k, str(getattr(e, k) or "")) for k in ("verdict", "line", "advice", "path",
                                                                              "grid"))

    def _on_finished(self, e: Any, when: str) -> None:
        how = "stopped early" if e.stopped_early else "finished"
        self.logs.append(f"{when} {how} after {e.steps} steps in {e.seconds:.1f}s; adapter: {e.path}")
        self.outcome = "stopped" if e.stopped_early else "finished"
        self.fields.update(result=e.path, step=e.steps, seconds=e.seconds)

    def _on_failed(self, e: Any, when: str) -> None:
        self.logs.append(f"{when} FAILED: {e.message}")
        self.outcome = "failed"
        self.fields.update(error=e.message)


class ThreadJob:
    """One run of ``train_fn(config, listeners=[...], control=...[, resume=run_dir])`` in a worker thread of this
    process (the test seam; the web UI runs ``app.runner.ProcessJob``). ``make_control()`` builds what it reads
    stop/save/sample requests from; ``user_errors`` carry messages meant for people, anything else is reported
    with its type and the traceback's tail in the log. ``versions`` is the service's version counter."""

    def __init__(self, run: str, config: Any, train_fn: Callable[..., Any], make_control: Callable[[], Any],
                 versions: Iterator[int], *, user_errors: tuple[type[BaseException], ...] = (),
                 resume: str | None = None):
        self.run = run
        self._train_fn, self._user_errors, self._resume = train_fn, user_errors, resume
        self._versions = versions
        self._lock = threading.Lock()
        self._control = make_control()
        self._fold = EventFold()
        self._stopping = False
        self._fold.log(f"{stamp()} {'resuming' if resume else 'starting'} run '{run}' -> {config.output_dir}")
        self._snap = self._fold.snapshot(next(versions), "starting", run, total_steps=config.max_train_steps)
        self._thread = threading.Thread(target=self._work, args=(config,), name=f"train-{run}", daemon=True)
        self._thread.start()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self._snap

    def poll(self) -> None:
        """Nothing to do: events arrive from the worker."""

    def stop(self) -> bool:
        """Ask the job to stop after its current step (it still saves); False when it is not running."""
        with self._lock:
            if not self._snap.active:
                return False
            self._control.stop()
            self._stopping = True
            self._fold.log("stop requested: finishing the current step, then saving the adapter")
            self._update()
            return True

    def request(self, what: str) -> bool:
        """'sample' or 'save' now; False when the job is not running."""
        with self._lock:
            if not self._snap.active:
                return False
            (self._control.sample_now if what == "sample" else self._control.save_now)()
            return True

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        self._thread.join(timeout)
        return self.snapshot()

    # -- worker side -----------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:  # caller holds the lock
        fold = self._fold
        state = changes.pop("state", None) or fold.outcome or (
            "stopping" if self._stopping else "running" if fold.started else "starting")
        self._snap = fold.snapshot(next(self._versions), state, self.run, **changes)

    def on_event(self, event: Any) -> None:
        """The listener given to the trainer."""
        with self._lock:
            self._fold.add(type(event).__name__, event)
            self._update()

    def _work(self, config: Any) -> None:
        path = None
        extra = {"resume": self._resume} if self._resume else {}
        try:
            path = self._train_fn(config, listeners=[self.on_event], control=self._control, **extra)
        except self._user_errors as err:
            self._fail(str(err))
        except Exception as err:  # noqa: BLE001 - shown to the user; the traceback goes to the log panel
            with self._lock:
                self._fold.logs.extend(traceback.format_exc().rstrip().splitlines()[-12:])
            self._fail(f"Training stopped by an unexpected error: {type(err).__name__}: {err}")
        else:
            with self._lock:
                done = self._fold.outcome in ("finished", "stopped")
            if not done or not path or not Path(path).is_file():
                self._fail(f"Training ended without writing an adapter (expected {path or 'a file'}); "
                           "see the log above.")

    def _fail(self, message: str) -> None:
        with self._lock:
            if self._fold.outcome != "failed":  # a Failed event may already have said it
                self._fold.log(f"FAILED: {message}")
                self._fold.outcome = "failed"
                self._update(error=message)


class DoneJob:
    """A job that ended before it began (its run could not be started): just its snapshot."""

    def __init__(self, snapshot: JobSnapshot):
        self.run = snapshot.run
        self._snap = snapshot

    def snapshot(self) -> JobSnapshot:
        return self._snap

    def poll(self) -> None:
        pass

    def stop(self) -> bool:
        return False

    def request(self, what: str) -> bool:
        return False


def version_counter() -> Iterator[int]:
    """The per-service counter every snapshot's ``version`` is drawn from."""
    return itertools.count(1)

