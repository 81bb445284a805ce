"""Target sets and the LoCon conv group: what the CLI names reach PEFT, train, export and load back."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.test_train import quick_config, tiny_base
from trainer.cli import build_parser, config_from_args
from trainer.config import CONV_TARGETS, UNET_CROSS_ATTENTION, TrainConfig
from trainer.errors import TrainerError
from trainer.files.adapters import apply_adapter, read_lora_file
from trainer.loop.train import train
from trainer.network.lora import groups_from_config, inject


def args(*extra):
    return config_from_args(build_parser().parse_args(["train", "--data", "d", "--out", "o", *extra]))


def test_cli_target_sets_expand_to_module_suffixes():
    c = args("--unet-targets", "cross-attn,ff", "--conv-rank", "8", "--conv-alpha", "4",
             "--text-encoder-targets", "all", "--train-text-encoder")
    assert c.unet_targets == list(UNET_CROSS_ATTENTION) + ["ff.net.0.proj", "ff.net.2"]
    assert c.conv_rank == 8 and c.conv_alpha == 4.0 and c.text_encoder_targets[-2:] == ["mlp.fc1", "mlp.fc2"]
    assert "attn1.to_q" in args("--unet-targets", "all").unet_targets and "proj_in" in args(
        "--unet-targets", "all").unet_targets
    with pytest.raises(TrainerError, match=r"--unet-targets 'mlp' is not one of cross-attn, attn, ff, all"):
        args("--unet-targets", "mlp")
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--unet-targets" in help_text and "--conv-rank" in help_text and "--text-encoder-targets" in help_text


def test_conv_modules_in_two_groups_are_refused():
    errors = TrainConfig(conv_rank=4, unet_targets=["attn2.to_q", "conv1"]).validate()
    assert "lists conv modules (conv1) while conv_rank is set" in errors["unet_targets"]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_locon_group_has_its_own_rank_trains_exports_and_reloads(tmp_path, arch):
    base = tiny_base(arch)
    config = quick_config(tmp_path, conv_rank=2, conv_alpha=1.0, unet_targets=list(UNET_CROSS_ATTENTION) +
                          ["ff.net.0.proj", "ff.net.2"], max_train_steps=3, save_precision="fp32")
    groups = {g.name: g for g in groups_from_config(config, base.components())}
    assert groups["conv"].rank == 2 and groups["conv"].alpha == 1.0 and groups["conv"].targets == {
        "unet": CONV_TARGETS}
    path = train(config, base=base)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        md = f.metadata()
        conv_downs = [f.get_tensor(k) for k in keys if k.endswith("lora_down.weight") and f.get_tensor(k).ndim == 4]
    assert conv_downs and all(t.shape[0] == 2 for t in conv_downs)            # conv rank, 4-D kohya LoCon
    assert json.loads(md["ss_network_args"])["conv_dim"] == 2
    fresh = tiny_base(arch)
    lora = read_lora_file(path)
    apply_adapter(fresh.components(), arch, lora, "check")               # every module finds its layer
    ff = [k for k in keys if "ff_net" in k or "_ff_" in k]
    assert ff, "feed-forward modules missing from the export"


def test_step_zero_equals_the_base_with_every_group(tmp_path):
    base = tiny_base()
    config = quick_config(tmp_path, conv_rank=2, unet_targets=["attn1.to_q", "attn2.to_k", "ff.net.2", "proj_in"],
                          train_text_encoder=True, text_encoder_targets=["self_attn.q_proj", "mlp.fc1"])
    x = torch.randn(1, 4, 16, 16)
    cond = torch.randn(1, 77, base.unet.config.cross_attention_dim)
    before = base.unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
    params = inject(base.components(), groups_from_config(config, base.components()))
    after = base.unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert torch.equal(before, after) and set(params) == {"unet", "conv", "text_encoder"}
    trainable = {n for c, m in base.components().items() for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
