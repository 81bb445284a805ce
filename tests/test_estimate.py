"""Preflight estimate (meta-device trace), CPU thread sharing, out-of-memory advice and the GPU fast-path
switches, on the built-in model and tiny models. The SD1.5-size accuracy check is slow-marked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import quick_config, tiny_base
from trainer import cli
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.events import Log
from trainer.loop import estimate as est
from trainer.loop import threads
from trainer.loop import train as loop
from trainer.loop.train import train

ROOT = Path(__file__).resolve().parent.parent
ZKW = str(ROOT / "examples" / "zkw")


def builtin_config(**kw) -> TrainConfig:
    return TrainConfig(data_dir=ZKW, output_dir="unused", max_train_steps=10, **kw)


def test_estimate_parts_and_scaling_with_batch_and_resolution():
    small = est.estimate(builtin_config(batch_size=1), baseline=0)
    big = est.estimate(builtin_config(batch_size=4, resolution=128), baseline=0)
    weights = small.parts["weights"]
    # the built-in model's frozen weights, counted from its configs: fp32 UNet + VAE + text encoder
    assert 20e6 < weights < 30e6 and big.parts["weights"] == weights
    assert small.parts["training step"] > 0 and small.peak_bytes == weights + small.parts["training step"]
    # 4x the pixels x 4x the batch: the activations grow about 16x (the adapter and optimizer state do not)
    ratio = big.parts["training step"] / small.parts["training step"]
    assert 8 < ratio < 20, ratio
    assert big.step_seconds > small.step_seconds > 0
    assert small.steps == 10 and small.total_seconds >= 10 * small.step_seconds


def test_gradient_checkpointing_and_half_precision_lower_the_traced_peak():
    plain = est.estimate(builtin_config(batch_size=4, resolution=128), baseline=0)
    ckpt = est.estimate(builtin_config(batch_size=4, resolution=128, gradient_checkpointing=True), baseline=0)
    half = est.estimate(builtin_config(batch_size=4, resolution=128, mixed_precision="bf16"), baseline=0)
    assert ckpt.parts["training step"] < 0.7 * plain.parts["training step"]
    assert half.parts["weights"] < 0.55 * plain.parts["weights"]          # bf16 UNet, text encoder and VAE
    assert half.parts["training step"] < plain.parts["training step"]


def test_cli_estimate_json_and_alternatives_when_it_does_not_fit(monkeypatch, capsys):
    assert cli.main(["estimate", "--data", ZKW, "--steps", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"peak_bytes", "step_seconds", "total_seconds", "assumptions", "alternatives", "fits"} <= set(out)
    assert out["steps"] == 6 and out["fits"] and out["alternatives"] == []
    assert out["peak_bytes"] > out["parts"]["process"] > 0     # CPU: the process's own memory is part of it
    # pretend the machine has little memory left: the estimate says so and lists what uses less
    monkeypatch.setattr(est, "free_memory", lambda device: out["peak_bytes"] // 2)
    assert cli.main(["estimate", "--data", ZKW, "--steps", "6", "--batch-size", "4", "--resolution", "128"]) == 0
    text = capsys.readouterr().out
    assert "may not fit" in text and "batch_size 1" in text and "gradient_checkpointing on" in text
    first, others = est.estimate_with_alternatives(builtin_config(batch_size=4, resolution=128))
    assert not first.fits and others
    assert all(o.peak_bytes < first.peak_bytes for o in others), [(o.change, o.peak_bytes) for o in others]


def test_estimate_refuses_a_model_it_cannot_read():
    with pytest.raises(TrainerError, match="does not exist"):
        est.estimate(builtin_config(model="/nowhere/model.safetensors"))
    with pytest.raises(TrainerError, match="hub id"):
        est.estimate(builtin_config(model="someone/some-model"))


def test_thread_share_splits_the_cores_between_running_jobs(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        first = threads.ThreadShare(0, folder=tmp_path, every_s=0)
        assert first.threads == 4 and "no other training job" in first.describe()
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            (tmp_path / f"{other.pid}.pid").write_text(str(other.pid))     # a second job registers
            assert first.refresh() == "cpu threads: 2 (4 physical core(s), 1 other training job(s) running)"
            assert torch.get_num_threads() == 2
        finally:
            other.kill()
            other.wait()
        assert first.refresh() is not None and first.threads == 4             # it ended: threads come back
        (tmp_path / "999999999.pid").write_text("stale")                      # a crashed job's file
        assert first.refresh() is None and not (tmp_path / "999999999.pid").exists()
        fixed = threads.ThreadShare(3, folder=tmp_path)
        assert fixed.threads == 3 and fixed.file is None and "set by cpu_threads" in fixed.describe()
        first.close()
        assert list(tmp_path.iterdir()) == []
    finally:
        torch.set_num_threads(before)


def test_physical_cores_is_within_the_affinity():
    assert 1 <= threads.physical_cores() <= len(os.sched_getaffinity(0))


def test_training_logs_its_threads(tmp_path):
    events = []
    before = torch.get_num_threads()
    try:
        train(quick_config(tmp_path, max_train_steps=1, cpu_threads=1), base=tiny_base(), listeners=[events.append])
    finally:
        torch.set_num_threads(before)
    assert any(isinstance(e, Log) and e.message.startswith("cpu threads: 1 (set by cpu_threads") for e in events)


def test_out_of_memory_ends_with_advice_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = loop.diffusion_loss

    def exhausted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("cannot allocate 4 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", exhausted)
    config = quick_config(tmp_path, max_train_steps=10, batch_size=1, checkpoint_every_n_steps=2)
    with pytest.raises(TrainerError, match=r"Out of memory at step 5 \(cannot allocate 4 GiB\)\. Settings that use "
                                           r"less: batch_size 1.*gradient_checkpointing.*estimate.*step-000004, is "
                                           r"kept.*saved to .*interrupted"):
        train(config, base=tiny_base())
    assert (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_channels_last_and_compile_switches(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    base = tiny_base()
    events = []
    train(quick_config(tmp_path, max_train_steps=1, torch_compile=True, channels_last=True), base=base,
          listeners=[events.append])
    assert compiled == [base.unet]
    assert base.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    logs = [e.message for e in events if isinstance(e, Log)]
    assert "UNet in channels-last memory format" in logs and any("torch.compile" in m for m in logs)


def test_cli_flags_for_the_fast_paths():
    args = cli.build_parser().parse_args(["train", "--data", ZKW, "--out", "x", "--compile", "--threads", "2",
                                          "--gradient-checkpointing"])
    config = cli.config_from_args(args)
    assert config.torch_compile and config.gradient_checkpointing and config.cpu_threads == 2
    assert TrainConfig(cpu_threads=-1).validate()["cpu_threads"].startswith("-1 must be 0")


# --- accuracy on an SD1.5-size model (slow: minutes, ~6 GiB) ------------------------------------------------

def _sd15_folder(folder: Path) -> Path:
    """An SD1.5-size diffusers folder with random weights, built from the shipped configs."""
    if (folder / "model_index.json").is_file():
        return folder
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.reference import save_sd15; "
            f"save_sd15({str(folder)!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def _measured_peak_rss(args: list[str], cwd: Path) -> int:
    """Peak resident memory of a `python -m trainer train` process, from the kernel's accounting."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args, "--quiet"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "auto"])
@pytest.mark.parametrize("resolution,batch", [(128, 1), (256, 2)])
def test_estimate_is_within_20_percent_of_the_measured_peak_on_sd15(tmp_path_factory, resolution, batch, precision):
    """fp32, and the default (bf16 on a CPU with native bf16, where the weights are loaded in bf16)."""
    model = _sd15_folder(tmp_path_factory.getbasetemp() / "sd15-random")
    tmp = tmp_path_factory.mktemp(f"sd15-{resolution}")
    flags = ["--data", ZKW, "--out", str(tmp / "run"), "--model", str(model), "--resolution", str(resolution),
             "--batch-size", str(batch), "--steps", "4", "--rank", "16", "--threads", "2", "--no-effect-check",
             "--mixed-precision", precision]
    out = subprocess.run([sys.executable, "-m", "trainer", "estimate", *flags, "--json"], cwd=tmp, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    predicted = json.loads(out)
    measured = _measured_peak_rss(flags, tmp)
    ran = json.loads((tmp / "run" / "config.json").read_text())["mixed_precision"]
    stamps = [json.loads(line)["time"] for line in (tmp / "run" / "events.jsonl").read_text().splitlines()
              if '"type": "Progress"' in line]
    step = sorted(b - a for a, b in zip(stamps, stamps[1:]))[len(stamps) // 2 - 1]
    print(f"{resolution}px batch {batch} {ran}: predicted {predicted['peak_bytes'] / 2**30:.2f} GiB, measured "
          f"{measured / 2**30:.2f} GiB; step predicted {predicted['step_seconds']:.2f} s, measured {step:.2f} s")
    assert abs(predicted["peak_bytes"] - measured) <= 0.2 * measured, (predicted["peak_bytes"], measured)
