"""Network types through PEFT (LoRA, DoRA, LoHa, LoKr): step 0 is the base, only adapter weights train, per-group
rank/alpha/lr reach PEFT, every type exports in the kohya/LyCORIS keys A1111/ComfyUI read (checked against the
formulas written out here by hand) and loads back exactly, LoHa runs train on SD1/SDXL and resume bitwise."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_export import assert_differs, assert_rel_close, sd1_pipe
from tests.test_lora import components, outputs
from tests.test_resume import assert_same_adapter
from tests.test_train import quick_config, stop_at, tiny_base
from tests.tiny_models import build_tiny
from trainer.cli import build_parser, config_from_args
from trainer.config import UNET_CROSS_ATTENTION, UNET_TARGET_SETS, TrainConfig
from trainer.errors import TrainerError
from trainer.files.adapters import apply_adapter, attached, read_lora_file, remove_adapter
from trainer.files.deltas import read_network_file
from trainer.files.export import build_metadata, lora_state_dict, save_adapter, save_diffusers_format
from trainer.loop.optimizers import make_optimizer
from trainer.loop.records import FileControl
from trainer.loop.train import train
from trainer.network.layers import adapter_parameters
from trainer.network.lora import groups_from_config, inject, lora_modules
from trainer.render.generate import Renderer

TYPES = ["lora", "dora", "loha", "lokr"]
PARTS = {"lora": "lora_A", "dora": "lora_magnitude_vector", "loha": "hada_w1_a", "lokr": "lokr_w1"}


def config_for(network: str, **kw) -> TrainConfig:
    """UNet rank 4 (LoKr: both Kronecker factors full on the 32-wide layers), text encoder rank 2 (LoKr: a
    low-rank w2), LoCon convs rank 2, each with its own alpha."""
    base = dict(network=network, rank=4, alpha=2.0, unet_targets=list(UNET_CROSS_ATTENTION) + ["proj_in", "ff.net.2"],
                conv_rank=2, conv_alpha=1.0, train_text_encoder=True, text_encoder_rank=2, text_encoder_alpha=3.0)
    return TrainConfig(**{**base, **kw})


def trained(arch: str, network: str, seed: int = 1, **kw) -> tuple[dict, dict, TrainConfig]:
    """(components with every adapter parameter random and non-zero, untouched base copy, config)."""
    comps = components(build_tiny(arch))
    base = copy.deepcopy(comps)
    config = config_for(network, **kw)
    inject(comps, groups_from_config(config, comps))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(comps).values():
            for p in adapter_parameters(layer, "default"):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.2 * noise.abs()) if _is_magnitude(layer, p) else noise * 0.3)
    return comps, base, config


def _is_magnitude(layer, p) -> bool:
    return hasattr(layer, "lora_magnitude_vector") and any(p is m.weight for m in layer.lora_magnitude_vector.values())


# --- the formulas A1111/ComfyUI apply, written out by hand ---------------------------------------------------------
def hand_delta(parts: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """dW of one module from its kohya/LyCORIS parts (network_lora/hada/lokr.py, comfy/weight_adapter/*.py)."""
    alpha = parts["alpha"].item()
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha / down.shape[0]
        if "dora_scale" not in parts:
            return delta
        merged = w + delta     # magnitude per output channel: each row of W + dW rescaled to dora_scale
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        return parts["dora_scale"].reshape(norm.shape) * merged / norm - w
    if "hada_w1_a" in parts:
        delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        return delta.reshape(w.shape) * alpha / parts["hada_w1_b"].shape[0]
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else None
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(w.shape) * (alpha / dim if dim else 1.0)


def by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        out.setdefault(name, {})[part] = t
    return out


def merge_by_hand_sd1(base: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """W += dW for every module, names from the documented SD1 rule (no trainer code)."""
    merged = copy.deepcopy(base)
    names = {"lora_unet_" + p.replace(".", "_"): m for p, m in merged["unet"].named_modules()}
    names |= {"lora_te_text_model_" + p.replace(".", "_"): m for p, m in merged["text_encoder"].named_modules()}
    with torch.no_grad():
        for name, parts in by_module(tensors).items():
            names[name].weight += hand_delta(parts, names[name].weight)
    return merged


# --- training side ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", TYPES)
def test_step0_is_the_base_and_only_adapter_parameters_train(network):
    comps = components(build_tiny("sd1"))
    before = outputs(comps, "sd1")
    params = inject(comps, groups_from_config(config_for(network), comps))
    after = outputs(comps, "sd1")
    for k in before:
        assert torch.equal(before[k], after[k]), k
    trainable = {n: p for c, m in comps.items() for n, p in m.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable.values()} == {id(p) for ps in params.values() for p in ps}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert any(PARTS[network] in n for n in trainable), sorted(trainable)[:4]
    other = set(PARTS.values()) - {PARTS[network]} - ({"lora_A"} if network == "dora" else set())
    assert not any(part in n for n in trainable for part in other)
    assert set(params) == {"unet", "conv", "text_encoder"} and all(params.values())


@pytest.mark.parametrize("network", TYPES)
def test_each_groups_rank_alpha_and_lr_reach_peft(network):
    comps = components(build_tiny("sd1"))
    config = config_for(network, learning_rate=1e-3, text_encoder_lr=5e-5)
    groups = groups_from_config(config, comps)
    assert {g.network for g in groups} == {network}
    params = inject(comps, groups)
    want = {"unet": (4, 2.0), "conv": (2, 1.0), "text_encoder": (2, 3.0)}
    seen = set()
    for key, (component, layer) in lora_modules(comps).items():
        group = "text_encoder" if component == "text_encoder" else "conv" if ".resnets." in key or "samplers" in key \
            else "unet"
        r, alpha = want[group]
        stored = layer.lora_alpha["default"] if network in ("lora", "dora") else layer.alpha["default"]
        assert (layer.r["default"], stored, layer.scaling["default"]) == (r, alpha, alpha / r), key
        assert {id(p) for p in adapter_parameters(layer, "default")} <= {id(p) for p in params[group]}
        seen.add(group)
    assert seen == set(want)
    lr_of = {g.name: g.lr for g in groups}
    optimizer = make_optimizer(config, [{"params": p, "lr": lr_of[n], "name": n} for n, p in params.items()])
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"unet": 1e-3, "conv": 1e-3, "text_encoder": 5e-5}


@pytest.mark.parametrize("network", ["lora", "dora"])
def test_rslora_scales_by_sqrt_rank_and_exports_an_alpha_every_tool_reads_the_same(network, tmp_path):
    comps, base, config = trained("sd1", network, use_rslora=True)
    for key, (component, layer) in lora_modules(comps).items():
        r = layer.r["default"]
        assert layer.scaling["default"] == pytest.approx(layer.lora_alpha["default"] / math.sqrt(r)), key
    tensors = lora_state_dict(comps, "sd1")
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    assert tensors[f"{q}.alpha"].item() == pytest.approx(2.0 * math.sqrt(4))
    want = outputs(comps, "sd1")
    assert_rel_close(outputs(merge_by_hand_sd1(base, tensors), "sd1"), want, tol=1e-5)
    path = save_adapter(tmp_path / "rs.safetensors", tensors, {}, dtype=torch.float32)
    fresh = copy.deepcopy(base)
    assert apply_adapter(fresh, "sd1", path, "x") == []
    assert_rel_close(outputs(fresh, "sd1"), want, tol=1e-5)
    pipe = sd1_pipe(copy.deepcopy(base))             # the diffusers-format copy says use_rslora; diffusers honours it
    pipe.load_lora_weights(str(save_diffusers_format(tmp_path / "rs-diffusers.safetensors", comps)))
    assert_rel_close(outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd1"), want, tol=1e-5)
    md = build_metadata(config, arch="sd1", prediction_type="epsilon", base_name="b", resolution=64, num_images=1,
                        steps=1, epoch=0, tag_frequency={}, training_started_at=0.0)
    assert float(md["ss_network_alpha"]) == pytest.approx(4.0) and json.loads(md["ss_network_args"])["rslora"]


# --- files --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", TYPES)
def test_export_matches_the_hand_formulas_and_loads_back_exactly(network, tmp_path):
    comps, base, config = trained("sd1", network)
    want = outputs(comps, "sd1")
    assert_differs(want, outputs(base, "sd1"))
    tensors = lora_state_dict(comps, "sd1")
    assert_rel_close(outputs(merge_by_hand_sd1(base, tensors), "sd1"), want, tol=1e-5)
    path = save_adapter(tmp_path / f"{network}.safetensors", tensors, {}, dtype=torch.float32)
    lora = read_lora_file(path)
    assert lora.unsupported == [] and len(lora.modules) == len(lora_modules(comps))
    fresh = copy.deepcopy(base)
    assert apply_adapter(fresh, "sd1", lora, "file") == []
    assert_rel_close(outputs(fresh, "sd1"), want, tol=1e-5)
    # deltas.py (bake/blend/resize) computes the same dW as the hand formulas
    nf = read_network_file(path)
    weights = {"lora_unet_" + p.replace(".", "_"): m.weight for p, m in base["unet"].named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for name, parts in by_module(tensors).items():
        if name in weights:
            w = weights[name].detach()
            assert torch.allclose(nf.modules[name].delta(w), hand_delta(parts, w), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lycoris_key_names_and_shapes(arch):
    """One UNet attention, one LoCon conv and one text-encoder module, their names written out by hand."""
    attn = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" if arch == "sd1" else
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    conv = "lora_unet_down_blocks_0_resnets_0_conv1" if arch == "sd1" else "lora_unet_input_blocks_1_0_in_layers_2"
    te = ("lora_te_" if arch == "sd1" else "lora_te1_") + "text_model_encoder_layers_0_self_attn_q_proj"
    width = 32 if arch == "sd1" else 64              # attn2.to_k reads the cross-attention width
    for network in TYPES:
        comps, _, _ = trained(arch, network)
        keys = lora_state_dict(comps, arch)
        mods = by_module(keys)
        expect = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
                  "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
                  "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}
        if network in expect:
            assert set(mods[attn]) == set(mods[conv]) == set(mods[te]) == expect[network], network
        else:   # rank 4 >= half of 8: both Kronecker factors full; rank 2 < 4: w2 low-rank
            assert set(mods[attn]) == {"lokr_w1", "lokr_w2", "alpha"} and mods[attn]["alpha"].item() == 4.0
            assert set(mods[te]) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
            assert mods[te]["lokr_w2_b"].shape[0] == 2 and mods[te]["alpha"].item() == 3.0
        if network == "dora":
            assert mods[attn]["dora_scale"].shape == (32, 1) and mods[conv]["dora_scale"].shape == (16, 1, 1, 1)
        if network == "loha":
            assert mods[attn]["hada_w1_a"].shape == (32, 4) and mods[attn]["hada_w1_b"].shape == (4, width)
            assert mods[conv]["hada_w1_b"].shape == (2, 16 * 9)       # 3x3 conv flattened, no Tucker core
        assert all(keys[k].shape == () and keys[k].dtype == torch.float32 for k in keys if k.endswith(".alpha"))


@pytest.mark.parametrize("network", ["dora", "loha", "lokr"])
def test_metadata_says_what_lycoris_writes_and_who_loads_it(network):
    md = build_metadata(config_for(network), arch="sd1", prediction_type="epsilon", base_name="b", resolution=64,
                        num_images=1, steps=1, epoch=0, tag_frequency={}, training_started_at=0.0)
    args = json.loads(md["ss_network_args"])
    assert md["ss_network_module"] == "lycoris.kohya"
    assert args["algo"] == {"dora": "lora"}.get(network, network) and args["conv_dim"] == 2
    assert (args.get("dora_wd"), args.get("wd_on_output")) == ((True, True) if network == "dora" else (None, None))
    assert "diffusers" in md["lora_trainer.network_note"]
    plain = build_metadata(config_for("lora"), arch="sd1", prediction_type="epsilon", base_name="b", resolution=64,
                           num_images=1, steps=1, epoch=0, tag_frequency={}, training_started_at=0.0)
    assert plain["ss_network_module"] == "networks.lora" and "lora_trainer.network_note" not in plain
    assert "algo" not in json.loads(plain["ss_network_args"])


def test_what_diffusers_does_with_each_type(tmp_path):
    """diffusers 0.42.1: LoHa/LoKr kohya files raise; a DoRA kohya file loads as plain LoRA (dora_scale dropped);
    the DoRA diffusers-format copy loads exactly; LoHa/LoKr have no diffusers-format copy."""
    for network in ("loha", "lokr"):
        comps, base, _ = trained("sd1", network, train_text_encoder=False, conv_rank=0)
        path = save_adapter(tmp_path / f"{network}.safetensors", lora_state_dict(comps, "sd1"), {},
                            dtype=torch.float32)
        with pytest.raises(ValueError, match="not been correctly renamed"):
            sd1_pipe(copy.deepcopy(base)).load_lora_weights(str(path))
        with pytest.raises(TrainerError, match="diffusers cannot load"):
            save_diffusers_format(tmp_path / "x.safetensors", comps)
    comps, base, _ = trained("sd1", "dora")
    want = outputs(comps, "sd1")
    tensors = lora_state_dict(comps, "sd1")
    path = save_adapter(tmp_path / "dora.safetensors", tensors, {}, dtype=torch.float32)
    pipe = sd1_pipe(copy.deepcopy(base))
    pipe.load_lora_weights(str(path))
    plain = {k: v for k, v in tensors.items() if not k.endswith(".dora_scale")}
    loaded = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    assert_rel_close(outputs(loaded, "sd1"), outputs(merge_by_hand_sd1(base, plain), "sd1"))
    assert_differs({"unet": outputs(loaded, "sd1")["unet"]}, {"unet": want["unet"]})
    peft_path = save_diffusers_format(tmp_path / "dora-diffusers.safetensors", comps)
    pipe = sd1_pipe(copy.deepcopy(base))
    pipe.load_lora_weights(str(peft_path))
    assert_rel_close(outputs({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "sd1"), want, tol=1e-5)
    ours = copy.deepcopy(base)
    assert apply_adapter(ours, "sd1", peft_path, "p") == []                  # our loader reads that copy too
    assert_rel_close(outputs(ours, "sd1"), want, tol=1e-5)


def test_a_preview_of_another_type_nests_and_comes_off_cleanly(tmp_path):
    """A LoRA file previewed on a LoHa run (PEFT wraps one layer in the other): training state untouched."""
    lora_comps, _, _ = trained("sd1", "lora", seed=3)
    path = save_adapter(tmp_path / "l.safetensors", lora_state_dict(lora_comps, "sd1"), {}, dtype=torch.float32)
    comps, base, _ = trained("sd1", "loha")
    trainable = {id(p) for m in comps.values() for p in m.parameters() if p.requires_grad}
    names = {n for m in comps.values() for n, _ in m.named_parameters()}
    before = outputs(comps, "sd1")
    assert apply_adapter(comps, "sd1", path, "preview", weight=0.0) == []
    assert attached(comps) == ["default", "preview"]
    assert {id(p) for m in comps.values() for p in m.parameters() if p.requires_grad} == trainable
    for k, v in outputs(comps, "sd1").items():
        assert torch.equal(v, before[k]), k
    assert remove_adapter(comps, "preview") > 0 and attached(comps) == ["default"]
    assert {n for m in comps.values() for n, _ in m.named_parameters()} == names   # checkpoint names unchanged
    for k, v in outputs(comps, "sd1").items():
        assert torch.equal(v, before[k]), k


# --- runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_loha_trains_on_every_linear_and_locon_conv(tmp_path, arch):
    base = tiny_base(arch)
    config = quick_config(tmp_path, network="loha", unet_targets=list(UNET_TARGET_SETS["all"]), conv_rank=2,
                          max_train_steps=2, save_precision="fp32")
    path = train(config, base=base)
    tensors = load_file(str(path))
    mods = by_module(tensors)
    assert all(set(p) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} for p in mods.values())
    conv = [n for n in mods if n.endswith(("conv1", "conv2", "in_layers_2", "out_layers_3"))]
    ff = [n for n in mods if n.endswith(("ff_net_0_proj", "ff_net_2"))]
    assert conv and ff and all(mods[n]["hada_w1_b"].shape[0] == 2 for n in conv)
    assert all(mods[n]["hada_w2_b"].abs().sum() > 0 for n in mods)            # moved off PEFT's zero init
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya" and json.loads(md["ss_network_args"])["algo"] == "loha"
    fresh = tiny_base(arch)
    assert apply_adapter(fresh.components(), arch, path, "check") == []
    renderer = Renderer(tiny_base(arch))                 # the preview/generate path takes the file as it is
    renderer.set_strengths({str(path): 0.8})
    assert attached(renderer.base.components()) == [renderer.attach(path)]


def test_loha_run_stopped_at_step_2_resumes_to_the_same_adapter(tmp_path):
    def config(out):
        return quick_config(tmp_path, output_dir=str(tmp_path / out), network="loha", conv_rank=2, max_train_steps=4,
                            checkpoint_every_n_steps=0, save_precision="fp32")

    whole = train(config("whole"), base=tiny_base())
    control = FileControl(tmp_path / "cut")
    train(config("cut"), base=tiny_base(), control=control, listeners=[stop_at(control, 2)])
    ckpt = tmp_path / "cut" / "checkpoints" / "step-000002" / "lora.safetensors"
    assert any(".hada_w1_a." in k for k in load_file(str(ckpt)))
    resumed = train(config("cut"), base=tiny_base(), resume=tmp_path / "cut")
    assert_same_adapter(resumed, whole)
    with pytest.raises(TrainerError, match="network was 'loha'"):
        train(config("cut").replace(network="lokr", max_train_steps=6), base=tiny_base(), resume=tmp_path / "cut")


def test_config_and_cli():
    c = config_from_args(build_parser().parse_args(["train", "--data", "d", "--out", "o", "--network", "lokr"]))
    assert c.network == "lokr"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--network", "oft"])
    errors = TrainConfig(network="loha", use_rslora=True, export_diffusers=True).validate()
    assert "lora/dora" in errors["use_rslora"] and "diffusers cannot load loha" in errors["export_diffusers"]
    assert "network" in TrainConfig(network="boft").validate()
    assert not TrainConfig(network="dora", use_rslora=True, export_diffusers=True).validate()
