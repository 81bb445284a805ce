"""Console front end for training events: a tqdm bar with loss / lr / ETA, logs on stderr."""
from __future__ import annotations

import sys

from tqdm import tqdm

from .events import Effect, Event, Failed, Finished, Log, Progress, Sample, Saved, Started, Validation


class ConsoleProgress:
    """A listener for ``train``; use as a context manager so the bar is always closed."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet, self.silent = quiet, silent
        self.bar: tqdm | None = None

    def __enter__(self) -> "ConsoleProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def _say(self, text: str) -> None:
        (self.bar.write if self.bar is not None else lambda t: print(t, file=sys.stderr))(text)

    def __call__(self, event: Event) -> None:
        if self.silent:
            return
        if isinstance(event, Started):
            self._say(f"training {event.total_steps} steps on {event.num_images} images, "
                      f"{event.trainable_params:,} trainable parameters -> {event.run_dir}")
            if not self.quiet:
                self.bar = tqdm(total=event.total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)
        elif isinstance(event, Progress):
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{event.avg_loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
                self.bar.update(event.step - self.bar.n)
        elif isinstance(event, Validation):
            self._say(f"validation loss at step {event.step}: {event.loss:.4f} ({event.images} held-out images)")
        elif isinstance(event, Log):
            self._say(event.message)
        elif isinstance(event, Saved):
            self._say(f"saved {'adapter' if event.final else 'checkpoint'} at step {event.step}: {event.path}")
        elif isinstance(event, Sample):
            self._say(f"samples at step {event.step}: {', '.join(event.paths)}")
        elif isinstance(event, Effect):
            self._say(f"effect check: {event.line}; {event.advice}" + (f" Grid: {event.grid}" if event.grid else ""))
        elif isinstance(event, Finished):
            how = "stopped" if event.stopped_early else "finished"
            self._say(f"{how} after {event.steps} steps in {event.seconds:.0f}s, final loss {event.final_loss:.4f}")
        elif isinstance(event, Failed) and event.step > 0:
            self._say(f"failed at step {event.step}")
