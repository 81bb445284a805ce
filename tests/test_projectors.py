"""Projector-layer LoRA: discovery, injection, kohya names, exact loading/blending, export options, training."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from tests.test_train import dataset_batch, fixed_batch_loss, quick_config
from tests.tiny_models import build_tiny, text_config
from trainer.loop import schedules
from trainer.files.adapters import apply_adapter, blend_files, read_lora_file, set_weights
from trainer.cli import build_parser, config_from_args
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.files.export import (GROUPS_KEY, PROJECTORS_KEY, build_metadata, lora_state_dict, portable_copy,
                            projector_metadata, save_adapter, write_portable_copy)
from trainer.network.lora import delete_adapter, find_projectors, groups_from_config, inject, lora_modules
from trainer.models.loader import BaseModel, encode_prompts
from trainer.loop.train import make_optimizer, train


def sd1_with_projector(seed: int = 0) -> dict:
    """Tiny SD1 components whose UNet has ``encoder_hid_proj`` (text_proj 32 -> 32), like the built-in model."""
    tiny = build_tiny("sd1", seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in tiny["unet"].config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**{**config, "encoder_hid_dim": 32, "encoder_hid_dim_type": "text_proj"})
    tiny["unet"] = unet.eval()
    return tiny


def comps_of(tiny: dict) -> dict:
    names = ("text_encoder", "text_encoder_2")
    return {"unet": tiny["unet"], **dict(zip(names, tiny["text_encoders"]))}


def base_model(tiny: dict) -> BaseModel:
    tiny["scheduler"].register_to_config(prediction_type="epsilon")
    return BaseModel(arch=tiny["arch"], prediction_type="epsilon", unet=tiny["unet"], vae=tiny["vae"],
                     text_encoders=tiny["text_encoders"], tokenizers=tiny["tokenizers"],
                     noise_scheduler=tiny["scheduler"], name="tiny-proj", source="tests", resolution=64)


def projector_only(**kw) -> TrainConfig:
    return TrainConfig(train_unet=False, train_projector=True, **kw)


def randomise_b(comps: dict, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(comps).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)


# --- discovery and refusal -------------------------------------------------------------------
def test_projectors_found_per_model():
    assert find_projectors(comps_of(sd1_with_projector())) == {"unet": ["encoder_hid_proj"]}
    assert find_projectors(comps_of(build_tiny("sdxl"))) == {
        "unet": ["add_embedding.linear_1", "add_embedding.linear_2"], "text_encoder_2": ["text_projection"]}
    group, = groups_from_config(projector_only(projector_rank=6, projector_alpha=3.0, projector_lr=2e-3),
                                comps_of(build_tiny("sdxl")))
    assert (group.name, group.rank, group.alpha, group.lr) == ("projectors", 6, 3.0, 2e-3)
    assert group.targets == {"unet": ("add_embedding.linear_1", "add_embedding.linear_2"),
                             "text_encoder_2": ("text_projection",)}


def test_model_without_projectors_is_refused_naming_what_was_looked_for():
    comps = comps_of(build_tiny("sd1"))
    with pytest.raises(TrainerError) as err:
        groups_from_config(projector_only(), comps)
    assert err.value.field == "train_projector"
    for word in ("no projector layers", "encoder_hid_proj", "add_embedding", "text_projection", "train_projector off"):
        assert word in str(err.value)


def test_projector_targets_select_and_unknown_entry_is_refused():
    comps = comps_of(build_tiny("sdxl"))
    group, = groups_from_config(projector_only(projector_targets=["text_encoder_2.text_projection"]), comps)
    assert group.targets == {"text_encoder_2": ("text_projection",)}
    group, = groups_from_config(projector_only(projector_targets=["add_embedding"]), comps)
    assert group.targets == {"unet": ("add_embedding.linear_1", "add_embedding.linear_2")}
    with pytest.raises(TrainerError, match="'encoder_hid_proj' names no projector.*text_encoder_2.text_projection"):
        groups_from_config(projector_only(projector_targets=["encoder_hid_proj"]), comps)


def test_config_and_cli_fields():
    assert TrainConfig(train_unet=False, train_projector=True).validate() == {}
    errors = TrainConfig(train_unet=False).validate()
    assert "train_projector" in errors["train_unet"]
    errors = TrainConfig(projector_rank=-1, projector_alpha=-2.0, projector_lr=3.0).validate()
    assert set(errors) == {"projector_rank", "projector_alpha", "projector_lr"} and "-1" in errors["projector_rank"]
    assert (TrainConfig(rank=8, alpha=4.0).proj_rank, TrainConfig(rank=8, alpha=4.0, projector_alpha=2.0).proj_alpha) \
        == (8, 2.0)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--train-projectors", "--no-unet",
                                      "--projector-rank", "32", "--projector-alpha", "16", "--projector-lr", "2e-3",
                                      "--portable"])
    c = config_from_args(args)
    assert (c.train_projector, c.train_unet, c.projector_rank, c.projector_alpha, c.projector_lr,
            c.export_portable) == (True, False, 32, 16.0, 2e-3, True)
    plain = config_from_args(build_parser().parse_args(["train", "--data", "d", "--out", "o"]))
    assert (plain.train_projector, plain.train_unet, plain.export_portable) == (False, True, False)


# --- injection, step 0, kohya names ------------------------------------------------------------
def unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ehs).sample


def test_step0_equals_base_and_keys_use_the_kohya_rule(tmp_path):
    tiny = sd1_with_projector()
    comps = comps_of(tiny)
    before = unet_out(tiny["unet"])
    config = TrainConfig(rank=4, alpha=4.0, train_projector=True, projector_rank=8, projector_alpha=2.0)
    params = inject(comps, groups_from_config(config, comps))
    assert set(params) == {"unet", "projectors"} and len(params["projectors"]) == 2
    assert torch.equal(unet_out(tiny["unet"]), before)                        # B = 0: exactly the base
    tensors = lora_state_dict(comps, "sd1")
    proj = {k: v for k, v in tensors.items() if "encoder_hid_proj" in k}
    assert set(proj) == {f"lora_unet_encoder_hid_proj.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert proj["lora_unet_encoder_hid_proj.lora_down.weight"].shape == (8, 32)
    assert proj["lora_unet_encoder_hid_proj.alpha"].item() == 2.0
    # a step-0 file applied by our loader is still exactly the base
    path = save_adapter(tmp_path / "s0.safetensors", tensors, {}, dtype=torch.float32)
    delete_adapter(comps, "default")
    assert apply_adapter(comps, "sd1", path, "s0", 1.0) == []
    assert torch.equal(unet_out(tiny["unet"]), before)


def test_sdxl_and_text_projection_names():
    comps = comps_of(build_tiny("sdxl"))
    inject(comps, groups_from_config(projector_only(rank=2, alpha=2.0), comps))
    names = {k.partition(".")[0] for k in lora_state_dict(comps, "sdxl")}
    assert names == {"lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2", "lora_te2_text_projection"}
    # SD1 layout with a projection text encoder: lora_te_text_projection
    tiny = build_tiny("sd1")
    comps = {"unet": tiny["unet"], "text_encoder": CLIPTextModelWithProjection(text_config(32))}
    inject(comps, groups_from_config(projector_only(rank=2, alpha=2.0), comps))
    assert {k.partition(".")[0] for k in lora_state_dict(comps, "sd1")} == {"lora_te_text_projection"}


# --- our loader: exact effect, round trip, blend -------------------------------------------------
def by_hand(layer: torch.nn.Linear, x: torch.Tensor, file: dict, name: str, weight: float) -> torch.Tensor:
    down, up, alpha = file[f"{name}.lora_down.weight"], file[f"{name}.lora_up.weight"], file[f"{name}.alpha"]
    w = layer.weight + weight * (alpha.item() / down.shape[0]) * (up @ down)
    return x @ w.T + (layer.bias if layer.bias is not None else 0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """An SDXL projector LoRA with random A and B (rank 4, alpha 1.5) written in fp32, and a fresh base."""
    trained = comps_of(build_tiny("sdxl"))
    inject(trained, groups_from_config(projector_only(rank=4, alpha=1.5), trained))
    randomise_b(trained)
    path = save_adapter(tmp_path_factory.mktemp("p") / "proj.safetensors", lora_state_dict(trained, "sdxl"),
                        {"ss_base_model_version": "sdxl_base_v1-0"}, dtype=torch.float32)
    return path, lora_state_dict(trained, "sdxl")


def test_loader_applies_projectors_exactly_at_weights(sdxl_file):
    path, _ = sdxl_file
    file = load_file(path)
    comps = comps_of(build_tiny("sdxl"))
    plain = {"lin1": comps["unet"].add_embedding.linear_1, "lin2": comps["unet"].add_embedding.linear_2,
             "proj": comps["text_encoder_2"].text_projection}
    xs = {k: torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(1)) for k, m in plain.items()}
    names = {"lin1": "lora_unet_label_emb_0_0", "lin2": "lora_unet_label_emb_0_2", "proj": "lora_te2_text_projection"}
    with torch.no_grad():
        want = {w: {k: by_hand(plain[k], xs[k], file, names[k], w) for k in plain} for w in (1.0, 0.5)}
        base = {k: plain[k](xs[k]) for k in plain}
        assert apply_adapter(comps, "sdxl", path, "p", 1.0) == []
        adapted = {"lin1": comps["unet"].add_embedding.linear_1, "lin2": comps["unet"].add_embedding.linear_2,
                   "proj": comps["text_encoder_2"].text_projection}
        for weight in (1.0, 0.5, 0.0):
            set_weights(comps, {"p": weight})
            for k, m in adapted.items():
                got = m(xs[k])
                if weight == 0.0:
                    assert torch.equal(got, base[k])
                else:
                    assert rel_err(got, want[weight][k]) < 1e-4, (k, weight)
                    assert rel_err(got, base[k]) > 1e-3, (k, weight)   # and it does change the output


def test_export_import_round_trip_exact(sdxl_file, tmp_path):
    path, tensors = sdxl_file
    lora = read_lora_file(path)
    assert lora.unsupported == [] and set(lora.modules) == {k.partition(".")[0] for k in tensors}
    for name, m in lora.modules.items():
        assert torch.equal(m["down"], tensors[f"{name}.lora_down.weight"])
        assert torch.equal(m["up"], tensors[f"{name}.lora_up.weight"])
        assert m["alpha"] == tensors[f"{name}.alpha"].item()
    comps = comps_of(build_tiny("sdxl"))
    assert apply_adapter(comps, "sdxl", lora, "again") == []
    again = lora_state_dict(comps, "sdxl", adapter_name="again")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_blend_keeps_projector_modules_exact(tmp_path):
    tiny = sd1_with_projector()
    files = []
    for seed, (r, a) in enumerate(((4, 2.0), (2, 8.0))):
        comps = comps_of(sd1_with_projector())
        inject(comps, groups_from_config(TrainConfig(rank=r, alpha=a, train_projector=True), comps))
        randomise_b(comps, seed)
        files.append(save_adapter(tmp_path / f"{seed}.safetensors", lora_state_dict(comps, "sd1"), {},
                                  dtype=torch.float32))
    out = blend_files([(files[0], 0.7), (files[1], -0.4)], tmp_path / "blend.safetensors")
    plain = tiny["unet"].encoder_hid_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta = sum(by_hand(plain, x, load_file(f), "lora_unet_encoder_hid_proj", w) - plain(x)
                    for f, w in zip(files, (0.7, -0.4)))
        want = plain(x) + delta
        comps = comps_of(tiny)
        assert apply_adapter(comps, "sd1", out, "b", 1.0) == []
        assert rel_err(tiny["unet"].encoder_hid_proj(x), want) < 1e-4


# --- metadata and the portable copy -----------------------------------------------------------
def test_metadata_lists_groups_and_notes_projectors(sdxl_file):
    _, tensors = sdxl_file
    config = projector_only(rank=4, alpha=1.5, projector_rank=8)
    md = build_metadata(config, arch="sdxl", prediction_type="epsilon", base_name="b", resolution=64, num_images=1,
                        steps=1, epoch=1, tag_frequency={}, training_started_at=0.0)
    assert [g["name"] for g in json.loads(md[GROUPS_KEY])] == ["projectors"]
    assert (md["ss_network_dim"], json.loads(md["ss_network_args"])["projector_dim"]) == ("8", 8)
    extra = projector_metadata(tensors)
    assert json.loads(extra[PROJECTORS_KEY]) == ["lora_te2_text_projection", "lora_unet_label_emb_0_0",
                                                 "lora_unet_label_emb_0_2"]
    assert "skip them" in extra["lora_trainer.projector_note"]
    mixed = {**tensors, "lora_unet_x_attn2_to_q.alpha": torch.tensor(1.0)}
    portable, pmd = portable_copy(mixed, {**md, **extra})
    assert list(portable) == ["lora_unet_x_attn2_to_q.alpha"]
    assert PROJECTORS_KEY not in pmd and json.loads(pmd[GROUPS_KEY]) == []
    assert json.loads(pmd["lora_trainer.portable"])["removed_projector_modules"] == json.loads(extra[PROJECTORS_KEY])
    assert projector_metadata(portable) == {}


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")   # our adapter was removed before loading
def test_diffusers_skips_the_projector_module_and_loads_the_rest(tmp_path):
    """What the README and the metadata note promise: a tool that does not know the module skips it."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer
    tiny = sd1_with_projector()
    comps = comps_of(tiny)
    inject(comps, groups_from_config(TrainConfig(rank=4, alpha=4.0, train_projector=True), comps))
    randomise_b(comps)
    tensors = lora_state_dict(comps, "sd1")
    path = save_adapter(tmp_path / "p.safetensors", tensors, {}, dtype=torch.float32)
    delete_adapter(comps, "default")
    pipe = StableDiffusionPipeline(vae=tiny["vae"], text_encoder=comps["text_encoder"],
                                   tokenizer=tiny["tokenizers"][0], unet=tiny["unet"], scheduler=tiny["scheduler"],
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    wrapped = [n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == len(tensors) // 3 - 1 and "encoder_hid_proj" not in wrapped


# --- training ----------------------------------------------------------------------------------
def test_projector_only_loss_falls_on_a_fixed_batch(tmp_path):
    """Only encoder_hid_proj's LoRA is trained, on one fixed batch (same images, noise, timesteps)."""
    base = base_model(sd1_with_projector())
    config = quick_config(tmp_path, train_unet=False, train_projector=True, projector_rank=8, projector_alpha=8.0,
                          projector_lr=3e-2)
    params = inject(base.components(), groups_from_config(config, base.components()))
    assert list(params) == ["projectors"]
    optimizer = make_optimizer(config, [{"params": params["projectors"], "lr": config.projector_lr}])
    batch = dataset_batch(config)
    pixels, captions = batch["pixel_values"], batch["captions"]
    first = fixed_batch_loss(base, pixels, captions)
    with torch.no_grad():   # the same latents, noise and timesteps as fixed_batch_loss
        latents = base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor
        noise = schedules.sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
        t = torch.tensor([100, 400, 700, 900][: len(captions)])
        noisy = base.noise_scheduler.add_noise(latents, noise, t)
    for _ in range(25):
        states = encode_prompts(base, captions)["encoder_hidden_states"]
        loss = torch.nn.functional.mse_loss(base.unet(noisy, t, encoder_hidden_states=states).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    last = fixed_batch_loss(base, pixels, captions)
    assert last < 0.95 * first, (first, last)    # 1.066 -> 0.991 here


def test_train_run_writes_projector_file_and_portable_copy(tmp_path):
    base = base_model(sd1_with_projector())
    config = quick_config(tmp_path, max_train_steps=2, train_projector=True, projector_rank=8, export_portable=True)
    path = train(config, base=base)
    full, portable = load_file(path), load_file(path.with_name("lora-portable.safetensors"))
    assert any(k.startswith("lora_unet_encoder_hid_proj.") for k in full)
    assert set(portable) == {k for k in full if "encoder_hid_proj" not in k} and portable
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    groups = {g["name"]: g for g in json.loads(md[GROUPS_KEY])}
    assert groups["projectors"]["targets"] == {"unet": ["encoder_hid_proj"]} and groups["projectors"]["rank"] == 8
    assert json.loads(md[PROJECTORS_KEY]) == ["lora_unet_encoder_hid_proj"]
    # the same copy made later from the file (the Export tab's "portable")
    later = load_file(write_portable_copy(path.rename(path.with_name("again.safetensors"))))
    assert later.keys() == portable.keys() and all(torch.equal(later[k], portable[k]) for k in later)


def test_portable_copy_of_a_projector_only_file_is_refused(sdxl_file):
    with pytest.raises(TrainerError, match="only projector modules"):
        write_portable_copy(sdxl_file[0])
