"""The smoothed training speed and time left (trainer/loop/pace.py)."""
from __future__ import annotations

import pytest

from trainer.loop.pace import StepPace


def test_warm_up_steps_are_not_measured():
    pace = StepPace(warmup=2)
    for seconds in (30.0, 8.0):          # loading, first allocations: far slower than the rest
        pace.add(seconds)
        assert pace.rate is None and pace.eta(100) is None
    pace.add(1.0)
    assert pace.seconds_per_step == pytest.approx(1.0)
    assert pace.eta(100) == pytest.approx(100.0)
    assert pace.rate == pytest.approx(1.0)


def test_a_run_whose_first_steps_are_slow_is_estimated_from_its_steady_speed():
    """The issue's case: the first estimate was three times the real time because it counted the slow start."""
    durations = [20.0, 6.0] + [0.5] * 8
    total = 300
    pace = StepPace()
    for d in durations:
        pace.add(d)
    real_left = (total - len(durations)) * 0.5
    assert pace.eta(total - len(durations)) == pytest.approx(real_left)
    naive = (total - len(durations)) * sum(durations) / len(durations)      # the old mean since the start
    assert naive > 5 * real_left


def test_one_slow_step_moves_the_estimate_a_little_and_a_new_speed_is_followed():
    pace = StepPace(warmup=0, smoothing=0.1)
    for _ in range(20):
        pace.add(1.0)
    pace.add(11.0)                        # a step that also drew samples
    assert 1.0 < pace.seconds_per_step < 2.5
    for _ in range(60):
        pace.add(2.0)                     # the run moved to a slower bucket
    assert pace.seconds_per_step == pytest.approx(2.0, rel=0.05)


def test_eta_never_negative_and_bad_settings_are_refused():
    pace = StepPace(warmup=0)
    pace.add(1.0)
    assert pace.eta(0) == 0.0 and pace.eta(-3) == 0.0
    with pytest.raises(ValueError, match="smoothing"):
        StepPace(smoothing=0.0)
