"""Export round trips: our kohya files load in diffusers and in our loader with the exact effect."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from tests.test_lora import components, outputs
from tests.tiny_models import build_tiny
from trainer.files.adapters import apply_adapter, read_lora_file, set_weights
from trainer.config import UNET_CROSS_ATTENTION, TrainConfig
from trainer.errors import TrainerError
from trainer.files.export import build_metadata, lora_state_dict, save_adapter, save_diffusers_format
from trainer.network.lora import groups_from_config, inject, lora_modules


def trained(arch: str, *, rank: int = 4, alpha: float = 2.0, seed: int = 1, te: bool = True,
            extra_targets: tuple[str, ...] = ("proj_in", "ff.net.2")) -> tuple[dict, dict, TrainConfig]:
    """(trained components with random non-zero A and B, untouched base copy, config)."""
    tiny = build_tiny(arch)
    comps = components(tiny)
    base = copy.deepcopy(comps)
    config = TrainConfig(rank=rank, alpha=alpha, unet_targets=list(UNET_CROSS_ATTENTION + extra_targets),
                         train_text_encoder=te, text_encoder_rank=2, text_encoder_alpha=3.0)
    inject(comps, groups_from_config(config, comps))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(comps).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return comps, base, config


def merge_by_hand_sd1(base: dict, tensors: dict[str, torch.Tensor], weight: float) -> dict:
    """W += weight * alpha/r * up @ down, names from the documented SD1 rule (no trainer code)."""
    merged = copy.deepcopy(base)
    names = {}
    for path, m in merged["unet"].named_modules():
        names["lora_unet_" + path.replace(".", "_")] = m
    for path, m in merged["text_encoder"].named_modules():
        names["lora_te_text_model_" + path.replace(".", "_")] = m
    with torch.no_grad():
        for key in [k for k in tensors if k.endswith(".alpha")]:
            name = key[: -len(".alpha")]
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            w = names[name].weight
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            w += weight * tensors[key].item() / down.shape[0] * delta
    return merged


def assert_rel_close(a: dict, b: dict, tol: float = 1e-4) -> None:
    for k in a:
        err = (a[k] - b[k]).abs().max().item() / b[k].abs().max().item()
        assert err < tol, f"{k}: relative error {err:.2e}"


def assert_differs(a: dict, b: dict) -> None:
    for k in a:
        assert (a[k] - b[k]).abs().max() > 1e-3, f"{k}: the LoRA has no visible effect; the test would be vacuous"


def sd1_pipe(base: dict):
    from diffusers import StableDiffusionPipeline
    tiny = build_tiny("sd1")
    return StableDiffusionPipeline(vae=tiny["vae"], text_encoder=base["text_encoder"], tokenizer=tiny["tokenizers"][0],
                                   unet=base["unet"], scheduler=tiny["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def n_lora_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, LoraLayer) for m in model.modules())


def test_sd1_file_in_diffusers_and_our_loader_matches_hand_merge(tmp_path):
    comps, base, _ = trained("sd1")
    path = save_adapter(tmp_path / "a.safetensors", lora_state_dict(comps, "sd1"), {}, dtype=torch.float32)
    tensors = load_file(path)
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {2.0, 3.0}   # real alphas
    base_out = outputs(base, "sd1")
    hand = {w: outputs(merge_by_hand_sd1(base, tensors, w), "sd1") for w in (1.0, 0.5)}
    assert_rel_close(outputs(comps, "sd1"), hand[1.0])
    assert_differs(hand[1.0], base_out)

    pipe = sd1_pipe(copy.deepcopy(base))
    pipe.load_lora_weights(str(path), adapter_name="ours")
    n_modules = len(tensors) // 3
    assert n_lora_layers(pipe.unet) + n_lora_layers(pipe.text_encoder) == n_modules  # nothing dropped
    loaded = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    assert_rel_close(outputs(loaded, "sd1"), hand[1.0])
    pipe.set_adapters(["ours"], [0.5])
    assert_rel_close(outputs(loaded, "sd1"), hand[0.5])

    ours = copy.deepcopy(base)
    assert apply_adapter(ours, "sd1", path, "a", weight=1.0) == []
    assert_rel_close(outputs(ours, "sd1"), hand[1.0])
    set_weights(ours, {"a": 0.5})
    assert_rel_close(outputs(ours, "sd1"), hand[0.5])
    set_weights(ours, {"a": 0.0})
    for k, v in outputs(ours, "sd1").items():
        assert torch.equal(v, base_out[k]), k


def test_sdxl_round_trip_ours_exact_and_diffusers_loads_sgm_names(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    comps, base, _ = trained("sdxl", extra_targets=("proj_in", "ff.net.2", "conv1", "downsamplers.0.conv",
                                                    "upsamplers.0.conv", "time_emb_proj"))
    tensors = lora_state_dict(comps, "sdxl")
    assert any(".input_blocks_" in k or k.startswith("lora_unet_input_blocks_") for k in tensors)
    assert not any(k.startswith("lora_unet_down_blocks") for k in tensors)
    path = save_adapter(tmp_path / "xl.safetensors", tensors, {}, dtype=torch.float32)
    want = outputs(comps, "sdxl")
    assert_differs(want, outputs(base, "sdxl"))

    ours = copy.deepcopy(base)
    assert apply_adapter(ours, "sdxl", path, "a") == []
    got = outputs(ours, "sdxl")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    set_weights(ours, {"a": 0.5})
    ours_half = outputs(ours, "sdxl")

    tiny = build_tiny("sdxl")
    other = copy.deepcopy(base)
    pipe = StableDiffusionXLPipeline(vae=tiny["vae"], text_encoder=other["text_encoder"],
                                     text_encoder_2=other["text_encoder_2"], tokenizer=tiny["tokenizers"][0],
                                     tokenizer_2=tiny["tokenizers"][1], unet=other["unet"], scheduler=tiny["scheduler"])
    pipe.load_lora_weights(str(path), adapter_name="ours")
    assert sum(n_lora_layers(m) for m in other.values()) == len(tensors) // 3   # no key left out
    assert_rel_close(outputs(other, "sdxl"), want)
    pipe.set_adapters(["ours"], [0.5])
    assert_rel_close(outputs(other, "sdxl"), ours_half)


def test_diffusers_format_copy_loads_in_diffusers_and_our_loader(tmp_path):
    comps, base, _ = trained("sd1")
    path = save_diffusers_format(tmp_path / "peft.safetensors", comps)
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in f.keys())
    want = outputs(comps, "sd1")
    pipe = sd1_pipe(copy.deepcopy(base))
    pipe.load_lora_weights(str(path), adapter_name="peft")
    assert_rel_close(outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd1"), want)
    lora = read_lora_file(path)
    assert lora.format == "peft" and lora.unsupported == []
    ours = copy.deepcopy(base)
    assert apply_adapter(ours, "sd1", lora, "p") == []
    assert_rel_close(outputs(ours, "sd1"), want)


def test_metadata_keys_strings_json_and_hashes(tmp_path):
    comps, _, config = trained("sd1")
    config = config.replace(name="mychar", data_dir="/data/10_mychar", trigger_word="mychar")
    md = build_metadata(config, arch="sd2", prediction_type="v_prediction", base_name="sd2-768.safetensors",
                        resolution=768, num_images=12, steps=300, epoch=5, tag_frequency={"mychar": 12, "hat": 3},
                        training_started_at=1700000000.5, extra={"note": "x"})
    assert all(isinstance(v, str) for v in md.values())
    required = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_v2", "ss_sd_model_name", "ss_resolution", "ss_clip_skip", "ss_num_train_images",
                "ss_output_name", "ss_training_started_at", "ss_steps", "ss_epoch", "ss_tag_frequency",
                "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.resolution",
                "modelspec.date", "modelspec.prediction_type", "lora_trainer.target_groups"]
    assert not [k for k in required if k not in md]
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["ss_v2"] == "True" and md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "2.0")
    assert md["modelspec.resolution"] == "768x768" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert json.loads(md["ss_tag_frequency"]) == {"10_mychar": {"mychar": 12, "hat": 3}}
    for k, v in md.items():
        if v.startswith(("{", "[")):
            json.loads(v)
    groups = json.loads(md["lora_trainer.target_groups"])
    assert [g["name"] for g in groups] == ["unet", "text_encoder"] and groups[1]["alpha"] == 3.0
    for arch, version in (("sd1", "sd_v1"), ("sdxl", "sdxl_base_v1-0")):
        m = build_metadata(config, arch=arch, prediction_type="epsilon", base_name="b", resolution=512, num_images=1,
                           steps=1, epoch=1, tag_frequency={}, training_started_at=0.0)
        assert m["ss_base_model_version"] == version and m["ss_v2"] == "False"

    path = save_adapter(tmp_path / "m.safetensors", lora_state_dict(comps, "sd1"), md)
    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: v for k, v in stored.items() if not k.startswith("sshs_")} == md
    # recompute as sd-scripts does: a copy with only ss_* metadata, hash after the header / at 1 MiB
    copy_bytes = st_save(tensors, {k: v for k, v in stored.items() if k.startswith("ss_")})
    n = int.from_bytes(copy_bytes[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(copy_bytes[8 + n:]).hexdigest()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(copy_bytes[0x100000:0x110000]).hexdigest()[:8]


def test_default_fp16_file_keeps_real_alpha_and_rejects_nan(tmp_path):
    comps, _, _ = trained("sd1", rank=4, alpha=2.0, te=False)
    path = save_adapter(tmp_path / "h.safetensors", lora_state_dict(comps, "sd1"), {})
    tensors = load_file(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert all(t.dim() == 0 and t.item() == 2.0 for t in alphas)
    assert all(t.is_contiguous() for t in tensors.values())
    bad = lora_state_dict(comps, "sd1")
    next(v for k, v in bad.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
    with pytest.raises(TrainerError, match="NaN"):
        save_adapter(tmp_path / "bad.safetensors", bad, {})
    assert not (tmp_path / "bad.safetensors").exists()


def test_failed_write_leaves_existing_file_intact(tmp_path, monkeypatch):
    comps, _, _ = trained("sd1", te=False)
    tensors = lora_state_dict(comps, "sd1")
    path = save_adapter(tmp_path / "keep.safetensors", tensors, {"ss_steps": "1"})
    original = path.read_bytes()

    def broken_write(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, tensors, {"ss_steps": "2"})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]   # no temp file left behind
