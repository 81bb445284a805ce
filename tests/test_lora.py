"""LoRA injection (PEFT) and kohya naming on tiny SD1/SDXL models."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import build_tiny
from trainer.config import TEXT_ENCODER_ATTENTION, UNET_CROSS_ATTENTION, TrainConfig
from trainer.errors import TrainerError
from trainer.files.export import lora_state_dict
from trainer.network.kohya import kohya_name, module_name_map, sgm_unet_path
from trainer.network.lora import TargetGroup, cast_frozen, count_trainable, groups_from_config, inject, lora_modules


def components(tiny: dict) -> dict:
    out = {"unet": tiny["unet"], "text_encoder": tiny["text_encoders"][0]}
    if len(tiny["text_encoders"]) > 1:
        out["text_encoder_2"] = tiny["text_encoders"][1]
    return out


def unet_inputs(arch: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10])
    if arch == "sdxl":
        return x, t, torch.randn(1, 5, 64, generator=g), {
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                  "time_ids": torch.randn(1, 6, generator=g)}}
    return x, t, torch.randn(1, 5, 32, generator=g), {}


@torch.no_grad()
def outputs(comps: dict, arch: str) -> dict[str, torch.Tensor]:
    x, t, ehs, kw = unet_inputs(arch)
    ids = torch.tensor([[49406, 320, 1125, 539, 1929, 49407]])
    out = {"unet": comps["unet"](x, t, ehs, **kw).sample}
    for name in ("text_encoder", "text_encoder_2"):
        if name in comps:
            out[name] = comps[name](ids, output_hidden_states=True).hidden_states[-1]
    return out


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_step0_outputs_equal_base_and_only_lora_trains(arch):
    comps = components(build_tiny(arch))
    before = outputs(comps, arch)
    config = TrainConfig(rank=4, alpha=2.0, train_text_encoder=True, text_encoder_rank=2, text_encoder_alpha=1.0)
    groups = groups_from_config(config, comps)
    assert [g.name for g in groups] == ["unet", "text_encoder"]
    params = inject(comps, groups)
    after = outputs(comps, arch)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    trainable = [p for m in comps.values() for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for ps in params.values() for p in ps}
    assert count_trainable(comps) == sum(p.numel() for ps in params.values() for p in ps)
    layers = lora_modules(comps)
    te_layers = [layer for key, (c, layer) in layers.items() if c != "unet"]
    assert te_layers and all(layer.r["default"] == 2 and layer.scaling["default"] == 0.5 for layer in te_layers)
    unet_layers = [layer for key, (c, layer) in layers.items() if c == "unet"]
    assert all(layer.r["default"] == 4 and layer.scaling["default"] == 0.5 for layer in unet_layers)
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) == 0 for _, layer in layers.values())
    if arch == "sdxl":
        assert any(c == "text_encoder_2" for c, _ in layers.values())


def test_cast_frozen_keeps_lora_fp32_and_param_identity():
    comps = components(build_tiny("sd1"))
    params = inject(comps, groups_from_config(TrainConfig(train_text_encoder=True), comps))
    cast_frozen(comps, torch.bfloat16)
    lora_ids = {id(p) for ps in params.values() for p in ps}
    for model in comps.values():
        for name, p in model.named_parameters():
            assert p.dtype == (torch.float32 if id(p) in lora_ids else torch.bfloat16), name
    live = {id(p) for m in comps.values() for p in m.parameters() if p.requires_grad}
    assert live == lora_ids


def test_groups_from_config_variants():
    comps = components(build_tiny("sdxl"))
    assert [g.name for g in groups_from_config(TrainConfig(), comps)] == ["unet"]
    g = groups_from_config(TrainConfig(train_unet=False, train_text_encoder=True, text_encoder_lr=3e-5), comps)[0]
    assert g.name == "text_encoder" and set(g.targets) == {"text_encoder", "text_encoder_2"} and g.lr == 3e-5
    unet = groups_from_config(TrainConfig(rank=8, alpha=3.0, learning_rate=2e-4), comps)[0]
    assert (unet.rank, unet.alpha, unet.lr, unet.targets["unet"]) == (8, 3.0, 2e-4, UNET_CROSS_ATTENTION)


def test_unmatched_targets_are_an_error_naming_group_pattern_and_modules():
    comps = components(build_tiny("sd1"))
    bad = TargetGroup("unet", {"unet": ("attn2.to_q", "attn2.to_qq")}, 4, 4.0, 1e-4)
    with pytest.raises(TrainerError) as err:
        inject(comps, [bad])
    msg = str(err.value)
    assert "'unet'" in msg and "attn2.to_qq" in msg and "to_q" in msg
    with pytest.raises(TrainerError, match="text_encoder_2"):
        inject(comps, [TargetGroup("text_encoder", {"text_encoder_2": ("q_proj",)}, 4, 4.0, 1e-4)])
    overlap = [TargetGroup("a", {"unet": ("to_q",)}, 4, 4.0, 1e-4),
               TargetGroup("b", {"unet": ("attn2.to_q",)}, 2, 1.0, 1e-4)]
    with pytest.raises(TrainerError, match="groups 'a' and 'b'"):
        inject(comps, overlap)


def test_group_specific_rank_and_alpha_in_one_component():
    comps = components(build_tiny("sd1"))
    groups = [TargetGroup("unet", {"unet": ("attn2.to_q",)}, 4, 1.0, 1e-4),
              TargetGroup("projectors", {"unet": ("proj_in", "proj_out")}, 2, 8.0, 1e-3)]
    params = inject(comps, groups)
    layers = lora_modules(comps)
    for key, (_, layer) in layers.items():
        want = (2, 4.0) if key.endswith(("proj_in", "proj_out")) else (4, 0.25)
        assert (layer.r["default"], layer.scaling["default"]) == want, key
    assert len(params["projectors"]) == 2 * sum(k.endswith(("proj_in", "proj_out")) for k in layers)


def test_kohya_key_set_sd1_matches_sd_scripts_rule():
    tiny = build_tiny("sd1")
    comps = components(tiny)
    unet_paths = [n for n, m in tiny["unet"].named_modules()
                  if any(n.endswith("." + t) for t in UNET_CROSS_ATTENTION)]
    te_paths = [n for n, m in tiny["text_encoders"][0].named_modules()
                if any(n.endswith("." + t) for t in TEXT_ENCODER_ATTENTION)]
    # sd-scripts: prefix + module path (text encoder inside text_model) with "." -> "_"
    expected = {"lora_unet_" + p.replace(".", "_") for p in unet_paths}
    expected |= {"lora_te_text_model_" + p.replace(".", "_") for p in te_paths}
    assert len(unet_paths) == 4 * 7 and len(te_paths) == 4 * 2
    inject(comps, groups_from_config(TrainConfig(train_text_encoder=True), comps))
    keys = lora_state_dict(comps, "sd1")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert names == expected
    assert set(keys) == {f"{n}.{s}" for n in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    # loading also accepts LDM-layout SD1 names (A1111/ComfyUI do) and diffusers' te1-without-text_model
    aliases = module_name_map(comps, "sd1", aliases=True)
    assert aliases["lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_q"] == \
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    assert aliases["lora_te1_encoder_layers_0_self_attn_q_proj"] == \
        ("text_encoder", "encoder.layers.0.self_attn.q_proj")


def test_kohya_names_sdxl_sgm_layout():
    tiny = build_tiny("sdxl")
    comps = components(tiny)
    cfg = tiny["unet"].config
    unet = lambda p: kohya_name("unet", p, "sdxl", cfg)  # noqa: E731
    # layers_per_block L = 2: down block b, layer j -> input_blocks.{1 + b*3 + j}; up -> output_blocks.{b*3 + j}
    assert unet("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
    assert unet("down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_out.0") == \
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_out_0"
    assert unet("mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
    assert unet("up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2") == \
        "lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_2"
    assert unet("up_blocks.1.attentions.0.proj_in") == "lora_unet_output_blocks_3_1_proj_in"
    assert sgm_unet_path("down_blocks.0.downsamplers.0.conv", cfg) == "input_blocks.3.0.op"
    assert sgm_unet_path("down_blocks.1.resnets.0.conv_shortcut", cfg) == "input_blocks.4.0.skip_connection"
    assert sgm_unet_path("mid_block.resnets.1.time_emb_proj", cfg) == "middle_block.2.emb_layers.1"
    assert sgm_unet_path("up_blocks.0.upsamplers.0.conv", cfg) == "output_blocks.2.2.conv"
    assert sgm_unet_path("up_blocks.1.upsamplers.0.conv", cfg) == "output_blocks.5.2.conv"
    assert sgm_unet_path("up_blocks.2.resnets.2.conv2", cfg) == "output_blocks.8.0.out_layers.3"
    assert sgm_unet_path("add_embedding.linear_1", cfg) == "label_emb.0.0"
    assert kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj", "sdxl") == \
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2", "sdxl") == \
        "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    names = module_name_map(comps, "sdxl")
    n_modules = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for c in comps.values() for m in c.modules())
    assert len(names) == n_modules  # one distinct kohya name per Linear/Conv2d
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"] == \
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == \
        ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    inject(comps, groups_from_config(TrainConfig(train_text_encoder=True), comps))
    assert module_name_map(comps, "sdxl") == names  # PEFT-wrapped layers keep their names
    keys = lora_state_dict(comps, "sdxl")
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_q.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha" in keys
