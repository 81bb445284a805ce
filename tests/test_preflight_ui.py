"""The UI's preflight through the service: the estimate line, and Start held back once when the run does not
fit in free memory."""
from __future__ import annotations

from tests.service_helpers import make_dataset
from trainer.loop import estimate as est


def _form(service, run: str, **changes):
    values = service.default_form()
    values.update(max_train_steps=5, **changes)
    return values


def test_estimate_line_and_start_held_back_once_when_it_does_not_fit(service, monkeypatch):
    from app.estimate_view import Preflight
    make_dataset(service.dataset_dir("demo"), n=4)
    values = _form(service, "demo")
    first, others = service.estimate_run("demo", values)
    # a trainer process's own memory (measured in a child process) is part of the CPU peak
    assert first.parts["process"] == service.trainer_process_memory() > 100 * 2**20
    assert first.steps == 5 and first.fits and others == []
    preflight = Preflight(service)
    go, line = preflight.check("demo", values)
    assert go and "Estimate: peak resident memory" in line and "may not fit" not in line
    monkeypatch.setattr(est, "free_memory", lambda device: first.peak_bytes // 2)
    go, line = preflight.check("demo", _form(service, "demo", batch_size=2))
    assert not go and "may not fit" in line and "batch_size 1" in line and "Start again" in line
    go, _ = preflight.check("demo", _form(service, "demo", batch_size=2))    # the second Start trains anyway
    assert go
    assert "No estimate" in preflight.line("demo", _form(service, "demo", model="/nowhere/model.safetensors"))
