"""Never lose a run: checkpoints, exact resume after SIGKILL and SIGTERM, run records, file control, NaN guard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import quick_config, stop_at, tiny_base
from trainer.errors import TrainerError
from trainer.events import Finished, Log, Progress
from trainer.loop import train as loop
from trainer.loop.records import FileControl, read_events, request
from trainer.loop.state import find_checkpoint, verify
from trainer.loop.train import train

ROOT = Path(__file__).resolve().parent.parent
# The built-in model on the example set: text encoder trained, batch 2, gradient accumulation 2.
ARGS = ["--data", str(ROOT / "examples" / "zkw"), "--preset", "quick", "--steps", "24", "--batch-size", "2",
        "--checkpoint-every", "4", "--train-text-encoder", "--set", "gradient_accumulation_steps=2", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", *args, "--no-effect-check"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.01)


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_adapter(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), "resumed adapter differs from the uninterrupted one"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = cli(*ARGS, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return Path(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_adapter(tmp_path, reference, sig):
    out = tmp_path / "run"
    proc = cli(*ARGS, "--out", str(out))
    wait_for(out / "checkpoints" / "step-000004" / "state.json", proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:   # a checkpoint and the adapter, then a non-zero exit saying how to resume
        assert proc.returncode == 128 + signal.SIGTERM
        assert f"--resume {out}" in stderr and stdout.strip().endswith("lora.safetensors")
        assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    else:
        assert proc.returncode == -signal.SIGKILL
        assert json.loads((out / "status.json").read_text())["state"] == "running"   # its pid is gone
    ckpt, _ = find_checkpoint(out)
    assert ckpt is not None and ckpt.step >= 4
    resumed = cli("--resume", str(out))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {ckpt.path} (step {ckpt.step}" in stderr
    assert_same_adapter(stdout.strip().splitlines()[-1], reference)
    steps = [e["step"] for e in read_events(out) if e["type"] == "Progress"]
    assert steps[-1] == 24 and steps[steps.index(ckpt.step) + 1] == ckpt.step + 1   # appended, continuing


def test_a_damaged_checkpoint_is_skipped_and_old_ones_pruned(tmp_path):
    config = quick_config(tmp_path, max_train_steps=6, checkpoint_every_n_steps=2, keep_checkpoints=2)
    train(config, base=tiny_base())
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]   # 6 is the end: no checkpoint
    optimizer = root / "step-000004" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])                               # cut mid-write
    (root / ".tmp-step-000006-999999").mkdir()                                        # a writer killed mid-write
    assert "optimizer.pt is damaged" in verify(root / "step-000004")
    size = json.loads((root / "step-000004" / "state.json").read_text())["files"]["optimizer.pt"]["bytes"]
    ckpt, skipped = find_checkpoint(tmp_path / "run")
    assert ckpt.step == 2 and skipped == [f"skipped step-000004: optimizer.pt is damaged (100 of {size} bytes)"]


def test_resume_refuses_a_changed_rank_and_logs_allowed_changes(tmp_path):
    config = quick_config(tmp_path, max_train_steps=4, checkpoint_every_n_steps=2)
    train(config, base=tiny_base())
    with pytest.raises(TrainerError, match=r"Cannot resume: rank was 4 in the checkpoint and is 8 now") as err:
        train(config.replace(rank=8), base=tiny_base(), resume=tmp_path / "run")
    assert err.value.field == "rank"
    events = []
    train(config.replace(max_train_steps=6, learning_rate=5e-4), base=tiny_base(), resume=tmp_path / "run",
          listeners=[events.append])
    lines = [e.message for e in events if isinstance(e, Log)]
    assert "resume: changed since the checkpoint: learning_rate: 0.001 -> 0.0005" in lines
    assert any(line.startswith("resumed from ") and "(step 2," in line for line in lines)
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4, 5, 6]


def test_resume_without_a_checkpoint_starts_at_step_zero(tmp_path):
    events = []
    train(quick_config(tmp_path, max_train_steps=2), base=tiny_base(), resume=tmp_path / "nothing-here",
          listeners=[events.append])
    assert any("no complete checkpoint in" in e.message and "starting from step 0" in e.message
               for e in events if isinstance(e, Log))
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]


def test_run_record_and_file_control(tmp_path):
    config = quick_config(tmp_path, max_train_steps=200, checkpoint_every_n_steps=0)
    run_dir = tmp_path / "run"
    control = FileControl(run_dir)

    def stop_soon(event):
        if isinstance(event, Progress) and event.step == 3:
            threading.Thread(target=request, args=(run_dir, "stop")).start()

    train(config, base=tiny_base(), control=control, listeners=[stop_soon])
    events = read_events(run_dir)
    done = [e for e in events if e["type"] == "Finished"][0]
    assert done["stopped_early"] and 3 <= done["steps"] <= 5          # answered within a step or two
    assert events[0]["type"] == "Log" and {"Started", "Progress", "Saved"} <= {e["type"] for e in events}
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["pid"] == os.getpid() and status["step"] == done["steps"]
    assert (run_dir / "checkpoints" / f"step-{done['steps']:06d}").is_dir()   # a stop writes a checkpoint
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"type": "Progress", "st')                                   # a line cut by a kill
    assert len(read_events(run_dir)) == len(events)


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    calls = []
    real = loop.diffusion_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(loop, "diffusion_loss", poisoned)
    events = []
    config = quick_config(tmp_path, max_train_steps=10, checkpoint_every_n_steps=2, min_snr_gamma=5.0)
    with pytest.raises(TrainerError, match=r"Training stopped at step 5: the loss became nan.*learning rate.*"
                                           r"bf16.*min_snr_gamma.*step-000004, is kept"):
        train(config, base=tiny_base(), listeners=[events.append])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    assert not any(isinstance(e, Finished) for e in events)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_tensorboard_files_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    train(quick_config(tmp_path, max_train_steps=3, validation_split=1), base=tiny_base(), listeners=[events.append])
    assert any(isinstance(e, Log) and e.message.startswith("TensorBoard: ") for e in events)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss/train")] == [1, 2, 3]
    assert [s.step for s in acc.Scalars("loss/validation")] == [0, 1, 2, 3]   # ten per run, at most one a step


def test_ema_is_exported_and_resumes_exactly_in_process(tmp_path):
    """EMA maths by hand; the export holds the EMA weights; stop at step 3 + resume == uninterrupted (bitwise)."""
    from trainer.loop.ema import Ema

    p = torch.nn.Parameter(torch.zeros(2))
    ema = Ema([p], 0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((2,), 1 - 0.9 ** 2))
    with ema.swapped_in():
        assert torch.allclose(p, torch.full((2,), 0.19))
    assert torch.equal(p.detach(), torch.ones(2))

    def config(out, **kw):
        return quick_config(tmp_path, output_dir=str(tmp_path / out), max_train_steps=6, ema_decay=0.5,
                            checkpoint_every_n_steps=0, save_precision="fp32", train_text_encoder=True, **kw)

    whole = train(config("whole"), base=tiny_base())
    control = FileControl(tmp_path / "cut")
    train(config("cut"), base=tiny_base(), control=control, listeners=[stop_at(control, 3)])
    assert (tmp_path / "cut" / "checkpoints" / "step-000003" / "ema.safetensors").is_file()
    resumed = train(config("cut"), base=tiny_base(), resume=tmp_path / "cut")
    assert_same_adapter(resumed, whole)
    plain = train(config("plain").replace(ema_decay=0.0), base=tiny_base())
    assert not all(torch.equal(a, b) for a, b in zip(tensors(plain).values(), tensors(whole).values()))
