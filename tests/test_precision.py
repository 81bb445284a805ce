"""mixed_precision "auto": bf16 where it is faster (GPUs with bf16, CPUs with native bf16 for SD-size UNets), fp32
for small models on a CPU; what it picked is written to config.json and the log, so a resume trains the same."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.test_train import quick_config, tiny_base
from trainer.events import Log
from trainer.loop import precision
from trainer.loop.train import train


def _unet(params: int) -> nn.Module:
    """A module with ``params`` parameters on the meta device (no memory)."""
    return nn.Linear(params // 1000, 1000, bias=False, device="meta")


@pytest.mark.parametrize("setting", ["no", "fp16", "bf16"])
def test_an_explicit_setting_is_kept(setting):
    assert precision.resolve(setting, _unet(1_000_000_000), "cpu")[0] == setting


def test_auto_on_a_cpu_follows_native_bf16_and_the_model_size(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve("auto", _unet(860_000_000), "cpu")[0] == "bf16"
    chosen, why = precision.resolve("auto", _unet(5_000_000), "cpu")
    assert chosen == "no" and "5M-parameter" in why
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    chosen, why = precision.resolve("auto", _unet(860_000_000), "cpu")
    assert chosen == "no" and "no native bf16" in why


def test_auto_on_a_gpu_is_bf16_or_fp16_on_older_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve("auto", _unet(5_000_000), "cuda")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve("auto", _unet(5_000_000), "cuda") == ("fp16", "this GPU has no bf16; fp16 with loss "
                                                                   "scaling")


def test_cpu_bf16_detection_answers_without_raising():
    assert isinstance(precision.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("native", [True, False])
def test_a_run_records_what_auto_picked(tmp_path, monkeypatch, native):
    """The tiny model is below the CPU threshold, so auto trains it in fp32 either way; a big one follows the CPU."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(precision, "CPU_BF16_MIN_PARAMS", 1 if native else precision.CPU_BF16_MIN_PARAMS)
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU's precision here")
    events = []
    config = quick_config(tmp_path, max_train_steps=1)
    assert config.mixed_precision == "auto"
    base = tiny_base()
    train(config, base=base, listeners=[events.append])
    want = "bf16" if native else "no"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == want
    lines = [e.message for e in events if isinstance(e, Log) and e.message.startswith("mixed precision:")]
    reason = "computes bf16 natively" if native else "no native bf16"
    assert len(lines) == 1 and lines[0].startswith(f"mixed precision: {'bf16' if native else 'fp32'} (")
    assert reason in lines[0] and lines[0].endswith("; set mixed_precision to choose)")
    frozen = {p.dtype for n, p in base.unet.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16 if native else torch.float32}


# --- the UNet read in the training dtype (no fp32 copy held) -------------------------------------------------

def _saved_unet(folder, **save):
    from tests.tiny_models import build_tiny
    unet = build_tiny("sdxl")["unet"]
    unet.save_pretrained(folder, **save)
    return unet


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [None, "20KB"])
def test_the_streamed_unet_equals_from_pretrained_in_that_dtype(tmp_path, dtype, shards):
    from diffusers import UNet2DConditionModel

    from trainer.models.stream import stream_unet
    _saved_unet(tmp_path / "unet", **({"max_shard_size": shards} if shards else {}))
    if shards:
        assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    got = stream_unet(tmp_path / "unet", dtype)
    want = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet", torch_dtype=dtype).state_dict()
    have = got.state_dict()
    assert set(have) == set(want)
    assert all(have[k].dtype == want[k].dtype and torch.equal(have[k], want[k]) for k in want)
    assert not any(p.device.type == "meta" for p in got.parameters())


def test_a_folder_it_cannot_stream_falls_back(tmp_path):
    from trainer.models.stream import stream_unet
    _saved_unet(tmp_path / "bin", safe_serialization=False)
    assert stream_unet(tmp_path / "bin", torch.bfloat16) is None
    _saved_unet(tmp_path / "other")                 # weights of another layout than the config says
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["layers_per_block"] = 1
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    assert stream_unet(tmp_path / "other", torch.bfloat16) is None
