"""The time of a traced step, measured by running its own operations: every distinct tensor operation the meta
trace saw (the function and its argument shapes, dtypes and strides) is counted; the costliest ones are run
here on random tensors of those shapes and timed, and the step's time is the sum over all of them (the ones not
run are scaled from the ones that were). A FLOP count over a peak rate misses how a device runs *these*
shapes: at 128 px an SD1.5-size UNet's lower blocks are 4x4 and 8x8 maps with 1280 channels, where reading the
weights, not multiplying, is the cost.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch

__all__ = ["OpLog", "TensorSpec", "step_seconds"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument as the replay recreates it: shape, strides and dtype (the data is random)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _spec(x):
    """An argument as a hashable key: tensors as their spec, lists and tuples as tuples."""
    if isinstance(x, torch.Tensor):
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return x


class OpLog:
    """Distinct operations of a trace with their call counts and a cost guess (FLOPs, bytes written) used
    only to pick which ones to time first."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.flops: dict = {}
        self.bytes: dict = {}

    def add(self, func, args, kwargs, flops: int, new_bytes: int) -> None:
        try:
            key = (func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))
            hash(key)
        except TypeError:       # an argument that cannot be a key: the op is counted by the tracker only
            return
        self.counts[key] += 1
        self.flops[key] = flops
        self.bytes[key] = new_bytes


_MEASURED: dict[tuple, float] = {}     # (device, op key) -> seconds per call, for the life of the process


def _materialize(x, device: torch.device):
    """A recorded argument back as a real one on ``device`` (random data, lists for sequences)."""
    if isinstance(x, TensorSpec):
        t = torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device=device)
        return t.normal_() if x.dtype.is_floating_point else t.zero_()
    if isinstance(x, tuple):
        return [_materialize(v, device) for v in x]
    if isinstance(x, torch.device) and x.type == "meta":
        return device
    return x


def _time_call(key, device: torch.device) -> float | None:
    """Seconds per call of one recorded operation on ``device``, or None when it cannot be run here."""
    func, args, kwargs = key
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        with torch.no_grad():
            real_args = _materialize(args, device)
            real_kwargs = {k: _materialize(v, device) for k, v in kwargs}
            func(*real_args, **real_kwargs)          # warm-up: kernel selection, first allocations
            sync()
            n, t0 = 0, time.perf_counter()
            while n < 2 or (time.perf_counter() - t0 < 0.004 and n < 50):
                func(*real_args, **real_kwargs)
                n += 1
            sync()
            return (time.perf_counter() - t0) / n
    except Exception:  # noqa: BLE001 - an op that needs real data (indices, shapes from values): not timed
        return None


def step_seconds(log: OpLog, steps: int, device: str, *, rate: float, overhead: float,
                 budget_s: float = 2.0) -> tuple[float, float]:
    """(seconds per step, share of the guessed cost that was timed for real) for a trace of ``steps`` steps.
    ``rate``: FLOP/s and ``overhead``: seconds per small op, for the guesses that order the timing and stand in
    for the operations not timed (scaled by how the timed ones compared with their guesses)."""
    dev = torch.device(device)
    bandwidth = 10e9 if dev.type == "cpu" else 500e9

    def guess(key) -> float:
        return max(overhead, log.flops[key] / rate + log.bytes[key] / bandwidth)

    order = sorted(log.counts, key=lambda k: guess(k) * log.counts[k], reverse=True)
    timed = guessed_timed = guessed_rest = small = 0.0
    start = time.perf_counter()
    for key in order:
        calls = log.counts[key]
        if guess(key) <= overhead:          # views, scalars, tiny tensors: the per-op cost is all there is
            small += overhead * calls
            continue
        seconds = _MEASURED.get((device, key))
        if seconds is None and time.perf_counter() - start < budget_s:
            seconds = _time_call(key, dev)
            if seconds is not None:
                _MEASURED[(device, key)] = seconds
        if seconds is None:
            guessed_rest += guess(key) * calls
        else:
            timed += max(seconds, overhead) * calls
            guessed_timed += guess(key) * calls
    scale = timed / guessed_timed if guessed_timed else 1.0
    total_guess = guessed_timed + guessed_rest
    return ((timed + guessed_rest * scale + small) / steps,
            guessed_timed / total_guess if total_guess else 1.0)
