"""The training speed and time left that progress events carry: a smoothed rate that ignores the first steps
(model warm-up, cache building, first allocations), so the first estimate is not several times too long."""
from __future__ import annotations


class StepPace:
    """Seconds per optimizer step, smoothed. ``add(seconds)`` once per step; the first ``warmup`` steps are not
    measured. The rest are averaged with an exponential moving average (``smoothing`` = the newest step's
    weight) corrected for its start, so the first measured steps count as a plain mean and later ones follow a
    change of speed (a sampling step, a slower bucket) without jumping. ``rate``/``eta`` are None until a step
    has been measured."""

    def __init__(self, warmup: int = 2, smoothing: float = 0.1):
        if warmup < 0 or not 0.0 < smoothing <= 1.0:
            raise ValueError(f"StepPace(warmup={warmup}, smoothing={smoothing}): need warmup >= 0 and "
                             "0 < smoothing <= 1")
        self.warmup, self.smoothing = warmup, smoothing
        self.steps = 0             # steps seen, warm-up included
        self._ema = 0.0
        self._weight = 0.0         # 1 - (1 - smoothing) ** measured steps: the EMA's start correction

    def add(self, seconds: float) -> None:
        self.steps += 1
        if self.steps <= self.warmup:
            return
        a = self.smoothing
        self._ema = (1.0 - a) * self._ema + a * max(float(seconds), 0.0)
        self._weight = (1.0 - a) * self._weight + a

    @property
    def seconds_per_step(self) -> float | None:
        return self._ema / self._weight if self._weight else None

    @property
    def rate(self) -> float | None:
        """Steps per second."""
        s = self.seconds_per_step
        return None if s is None else 1.0 / max(s, 1e-9)

    def eta(self, remaining_steps: int) -> float | None:
        """Seconds until ``remaining_steps`` more steps are done."""
        s = self.seconds_per_step
        return None if s is None else max(int(remaining_steps), 0) * s
