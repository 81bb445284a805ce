"""The service's file tools: compact blends with their fit report, inspect, convert and bake (on an adapter the real
trainer makes for the built-in model in a couple of steps, once for the module), and the trainer command for
several GPUs (the device count faked: no GPU needed).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from app import runner
from app.runner import ProcessJob, trainer_command
from app.service import Service, TrainerError
from tests.service_helpers import make_dataset
from trainer.config import PRESETS_DIR


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Service and the rank-8 adapter its trainer process wrote for run 'real' (2 steps on the built-in model)."""
    tmp = tmp_path_factory.mktemp("files")
    shutil.copytree(PRESETS_DIR, tmp / "presets")
    service = Service(tmp / "outputs", presets_dir=tmp / "presets")
    service.add_files("real", sorted(make_dataset(tmp / "src", n=4, size=64).iterdir()))
    form = {**service.preset_form("quick"), "max_train_steps": 2, "batch_size": 1, "trigger_word": "zkw"}
    service.start_training("real", form)
    snap = service.jobs.wait(300)
    assert snap.state == "finished", snap.error
    return service, snap.result


def ranks(path: str) -> set[int]:
    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")}


def test_compact_blend_reports_its_error_and_writes_the_rank(trained):
    service, adapter = trained
    path, summary = service.save_blend([(adapter, 1.0), (adapter, -0.25)], "exact", 0)
    assert ranks(path) == {2 * r for r in ranks(adapter)} and "exact (rank concatenation): relative error 0" in summary

    path, summary = service.save_blend([(adapter, 1.0), (adapter, -0.25)], "small", 2)
    assert Path(path) == service.outputs / "_blends" / "small.safetensors" and ranks(path) == {2}
    with safe_open(path, "pt") as f:
        compact = json.loads(f.metadata()["lora_trainer.compact"])
    assert compact["rank"] == 2 and 0 < compact["overall_error"] < 1
    assert f"relative error overall {compact['overall_error']:.3e}" in summary
    assert re.search(r"\n  lora_\w+: rank \d+ -> 2, error \d", summary)     # the worst modules are listed
    assert path in [p for _, p in service.adapters()]
    for bad in (-1, 2.5, "two"):
        with pytest.raises(TrainerError, match="Compact rank"):
            service.save_blend([(adapter, 1.0), (adapter, 0.5)], "bad", bad)


def test_inspect_and_convert_there_and_back(trained):
    service, adapter = trained
    text = service.inspect(adapter)
    assert text.startswith("lora.safetensors\nformat: kohya-diffusers") and "unet: " in text and "; rank " in text
    with pytest.raises(TrainerError, match="does not exist"):
        service.inspect(str(service.outputs / "nope.safetensors"))

    peft = service.convert(adapter, "peft")
    assert Path(peft.path) == Path(adapter).with_name("lora-peft.safetensors") and "peft layout" in peft.summary
    with safe_open(peft.path, "pt") as f:
        assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in f.keys())
    back = service.convert(peft.path, "kohya")
    assert Path(back.path).name == "lora-peft-kohya.safetensors"
    want, got = load_file(adapter), load_file(back.path)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(TrainerError, match="already in the kohya layout"):
        service.convert(adapter, "kohya")
    with pytest.raises(TrainerError, match="not one of"):
        service.convert(adapter, "ckpt")


def test_bake_writes_under_baked_without_overwriting(trained):
    service, adapter = trained
    one = service.bake(adapter, 1.0, "file")
    assert Path(one.path) == service.outputs / "_baked" / "real-lora-x1.safetensors"
    assert "single file" in one.summary and "lora.safetensors x1" in one.summary
    zero = service.bake(adapter, 0.0, "file")
    again = service.bake(adapter, 1.0, "file")
    assert Path(again.path).name == "real-lora-x1-2.safetensors"
    a, b, c = load_file(one.path), load_file(zero.path), load_file(again.path)
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)     # the weight changed something
    assert all(torch.equal(a[k], c[k]) for k in a)
    folder = service.bake(adapter, 1.0, "folder")
    assert (Path(folder.path) / "unet").is_dir() and "diffusers folder" in folder.summary
    assert not [p for _, p in service.adapters() if "_baked" in p]      # checkpoints are not adapters
    with pytest.raises(TrainerError, match="not one of"):
        service.bake(adapter, 1.0, "ckpt")


# --- devices -----------------------------------------------------------------------------------
def test_trainer_command_for_one_and_several_gpus():
    assert trainer_command(["--resume", "r"]) == [sys.executable, "-m", "trainer", "train", "--resume", "r"]
    assert trainer_command(["--resume", "r"], 3) == [sys.executable, "-m", "accelerate.commands.launch",
                                                     "--num_processes", "3", "-m", "trainer", "train", "--resume", "r"]


class FakePopen:
    """A trainer process that has already exited with code 1."""

    def __init__(self, cmd, **kw):
        self.cmd, self.pid, self.returncode = cmd, 4242, 1

    def poll(self):
        return 0


def test_runs_launch_on_the_gpus_asked_for(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(runner.subprocess, "Popen", lambda cmd, **kw: launched.append(cmd) or FakePopen(cmd))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    svc = Service(tmp_path / "out")
    svc.add_files("r", sorted(make_dataset(tmp_path / "src", n=2, size=64).iterdir()))
    assert svc.gpu_count() == 4
    svc.start_training("r", svc.default_form(), gpus=2)
    cmd = launched[-1]
    assert cmd[:6] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m"]
    assert cmd[6:9] == ["trainer", "train", "--config"]
    svc.jobs.wait(10)
    with pytest.raises(TrainerError, match="4 CUDA GPU"):
        svc.start_training("r", svc.default_form(), gpus=5)
    svc.start_training("r", svc.default_form())
    assert launched[-1][:4] == [sys.executable, "-m", "trainer", "train"]


def test_a_multi_process_trainer_is_followed_by_when_it_started(tmp_path):
    """With accelerate, status.json carries rank 0's pid, not the launcher's: a status started after the launch
    counts as this job's, an older one (an earlier run of the folder) does not."""
    job = ProcessJob(run="r", run_dir=tmp_path, versions=iter(range(1, 100)), pid=10, proc=None)
    assert job._ours({"pid": 10}) and not job._ours({"pid": 11, "started": 5.0})
    job._launched = 100.0
    assert job._ours({"pid": 11, "started": 100.5}) and not job._ours({"pid": 11, "started": 99.0})
