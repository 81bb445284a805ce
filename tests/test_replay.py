"""The estimate's step time: the meta trace logs each distinct operation with its call count; the costliest are
run for real on random tensors of their shapes, once per process; the rest are scaled from those."""
from __future__ import annotations

import torch

from trainer.loop import replay
from trainer.loop.trace import PeakTracker


def _trace(fn) -> replay.OpLog:
    log = replay.OpLog()
    with PeakTracker(log=log):
        fn()
    return log


def _work():
    a = torch.empty(64, 128, device="meta")
    b = torch.empty(128, 32, device="meta")
    for _ in range(3):
        torch.mm(a, b)
    torch.nn.functional.conv2d(torch.empty(1, 8, 16, 16, device="meta"), torch.empty(4, 8, 3, 3, device="meta"),
                               padding=[1, 1])
    return torch.randn(5, device="meta")


def test_distinct_operations_are_counted_with_their_shapes_and_flops():
    log = _trace(_work)
    mm = [k for k in log.counts if "mm" in str(k[0]) and "addmm" not in str(k[0])]
    assert len(mm) == 1 and log.counts[mm[0]] == 3
    func, args, _ = mm[0]
    assert args[0] == replay.TensorSpec((64, 128), (128, 1), torch.float32)
    assert log.flops[mm[0]] == 2 * 64 * 128 * 32 and log.bytes[mm[0]] == 64 * 32 * 4
    conv = [k for k in log.counts if "convolution" in str(k[0])]
    assert conv and conv[0][1][3:5] == ((1, 1), (1, 1))   # stride and padding lists kept, as tuples


def test_recorded_arguments_come_back_as_real_tensors_on_the_device():
    spec = replay.TensorSpec((2, 3), (1, 2), torch.bfloat16)     # a transposed layout
    t = replay._materialize(spec, torch.device("cpu"))
    assert t.shape == (2, 3) and t.stride() == (1, 2) and t.dtype == torch.bfloat16
    ints = replay._materialize(replay.TensorSpec((4,), (1,), torch.long), torch.device("cpu"))
    assert ints.tolist() == [0, 0, 0, 0]
    assert replay._materialize(torch.device("meta"), torch.device("cpu")) == torch.device("cpu")
    assert replay._materialize((1, (2, 3)), torch.device("cpu")) == [1, [2, 3]]


def test_each_operation_is_timed_once_per_process_and_all_are_counted(monkeypatch):
    log = _trace(_work)
    calls = []
    monkeypatch.setattr(replay, "_MEASURED", {})
    monkeypatch.setattr(replay, "_time_call", lambda key, dev: calls.append(key) or 0.01)
    seconds, share = replay.step_seconds(log, 1, "cpu", rate=1e3, overhead=1e-6)
    timed = set(calls)
    assert timed and len(calls) == len(timed)
    # every timed op counts 0.01 s per call; the ones at the per-op floor count the floor
    want = sum(0.01 * log.counts[k] for k in timed) + sum(1e-6 * n for k, n in log.counts.items() if k not in timed)
    assert abs(seconds - want) < 1e-9 and share == 1.0
    calls.clear()
    assert replay.step_seconds(log, 1, "cpu", rate=1e3, overhead=1e-6)[0] == seconds and calls == []
    assert replay.step_seconds(log, 2, "cpu", rate=1e3, overhead=1e-6)[0] == seconds / 2   # per step


def test_operations_not_timed_are_scaled_from_the_timed_ones(monkeypatch):
    log = _trace(_work)
    monkeypatch.setattr(replay, "_MEASURED", {})
    # the first op timed takes twice its guess; nothing else can run (budget spent, or not runnable here)
    first = {}

    def fake(key, dev):
        if first:
            return None
        first[key] = True
        return 2 * max(1e-6, log.flops[key] / 1e3 + log.bytes[key] / 10e9)
    monkeypatch.setattr(replay, "_time_call", fake)
    seconds, share = replay.step_seconds(log, 1, "cpu", rate=1e3, overhead=1e-6)
    guess = {k: max(1e-6, log.flops[k] / 1e3 + log.bytes[k] / 10e9) for k in log.counts}
    big = sum(g * log.counts[k] for k, g in guess.items() if g > 1e-6)
    small = sum(1e-6 * log.counts[k] for k, g in guess.items() if g <= 1e-6)
    assert abs(seconds - (2 * big + small)) < 1e-9 * max(1.0, seconds)
    assert 0 < share < 1


def test_a_real_operation_is_timed_on_this_machine():
    log = _trace(_work)
    key = next(k for k in log.counts if "convolution" in str(k[0]))
    seconds = replay._time_call(key, torch.device("cpu"))
    assert seconds is not None and seconds > 0
