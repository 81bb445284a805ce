"""Base models: built-in, diffusers folders, single-file round trips, detection, prompts, errors (tiny, CPU)."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.tiny_models import build_tiny, text_config
from trainer.models.checkpoint import read_checkpoint, to_ldm_state_dict
from trainer.errors import TrainerError
from trainer.models.loader import (CONFIGS_DIR, BaseModel, detect_checkpoint, encode_prompts, load_base_model,
                                   make_pipeline, save_config_folder, save_single_file)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """The built-in model's weight cache goes to a temp dir, built once for this module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def builtin(cache_home) -> BaseModel:
    return load_base_model("builtin")


def as_base(tiny: dict, prediction_type: str = "epsilon") -> BaseModel:
    return BaseModel(tiny["arch"], prediction_type, tiny["unet"], tiny["vae"], tiny["text_encoders"],
                     tiny["tokenizers"], tiny["scheduler"], name="tiny", source="tiny", resolution=16)


def tiny_sdxl_two_widths() -> dict:
    """Tiny SDXL whose encoders differ in width, as in the real model (diffusers tells them apart by it)."""
    tiny = build_tiny("sdxl")
    torch.manual_seed(1)
    config = dict(tiny["unet"].config, cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=24 + 6 * 8)
    tiny["unet"] = UNet2DConditionModel.from_config(config).eval()
    tiny["text_encoders"][1] = CLIPTextModelWithProjection(text_config(48, projection=24)).eval()
    return tiny


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]


def assert_same_model(expected: BaseModel, loaded) -> None:
    """``loaded``: a BaseModel or a diffusers pipeline."""
    if isinstance(loaded, BaseModel):
        encoders = loaded.text_encoders
    else:
        encoders = [loaded.text_encoder] + ([loaded.text_encoder_2] if hasattr(loaded, "text_encoder_2") else [])
    assert_same_weights(expected.unet, loaded.unet)
    assert_same_weights(expected.vae, loaded.vae)
    assert len(encoders) == len(expected.text_encoders)
    for mine, theirs in zip(expected.text_encoders, encoders):
        assert_same_weights(mine, theirs)


def assert_frozen(base: BaseModel) -> None:
    for module in (base.unet, base.vae, *base.text_encoders):
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())


# --- built-in model -------------------------------------------------------------------------------

def test_builtin_loads_frozen_with_pipeline_names(builtin):
    assert (builtin.arch, builtin.prediction_type, builtin.name, builtin.is_builtin) == ("sd1", "epsilon", "builtin",
                                                                                         True)
    assert builtin.resolution == builtin.vae.config.sample_size  # = UNet sample_size x VAE downscale
    assert list(builtin.components()) == ["unet", "text_encoder"]
    assert builtin.noise_scheduler.config.prediction_type == "epsilon"
    assert_frozen(builtin)


def test_builtin_is_deterministic_and_cached(builtin, cache_home, tmp_path, monkeypatch):
    assert_same_model(builtin, load_base_model("builtin"))  # second load: from the cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: built again from configs
    assert_same_model(builtin, load_base_model("builtin"))


def test_builtin_exports_as_a_single_file_checkpoint(builtin, tmp_path):
    """The demo model goes through the same single-file path as a user's civitai checkpoint."""
    from trainer.models.builtin import BUILTIN_DIR
    path = save_single_file(builtin, tmp_path / "builtin.safetensors")
    assert detect_checkpoint(read_checkpoint(path).keys()) == ("sd1", "epsilon")
    assert_same_model(builtin, load_base_model(str(path), config_dir=str(BUILTIN_DIR)))


def test_builtin_pipeline_generates_an_image(builtin):
    pipe = make_pipeline(builtin)
    assert pipe.unet is builtin.unet and pipe.vae is builtin.vae and pipe.text_encoder is builtin.text_encoders[0]
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    size = builtin.resolution
    image = pipe("a cat", num_inference_steps=1, height=size, width=size, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, size, size, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


@pytest.mark.parametrize("sampler,cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
def test_make_pipeline_samplers(builtin, sampler, cls):
    pipe = make_pipeline(builtin, sampler)
    assert type(pipe.scheduler).__name__ == cls
    assert pipe.scheduler.config.prediction_type == builtin.prediction_type


# --- diffusers folders and single files -----------------------------------------------------------

def test_diffusers_folder_round_trip(tiny_sd1, tmp_path):
    base = as_base(tiny_sd1)
    make_pipeline(base).save_pretrained(tmp_path / "my-model")
    loaded = load_base_model(str(tmp_path / "my-model"))
    assert (loaded.arch, loaded.prediction_type, loaded.name) == ("sd1", "epsilon", "my-model")
    assert loaded.source == str((tmp_path / "my-model").resolve())
    assert_same_model(base, loaded)
    assert_frozen(loaded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_run_loads_the_folder_in_its_dtype(tiny_sd1, tmp_path, dtype):
    """The UNet and text encoder arrive in the run's dtype (the UNet read a tensor at a time), the VAE in bf16
    beside bf16 and in fp32 beside fp16; the values are the fp32 weights rounded once."""
    base = as_base(tiny_sd1)
    make_pipeline(base).save_pretrained(tmp_path / "my-model")
    loaded = load_base_model(str(tmp_path / "my-model"), dtype=dtype)
    assert {p.dtype for p in loaded.unet.parameters()} == {dtype}
    assert {p.dtype for p in loaded.text_encoders[0].parameters()} == {dtype}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.bfloat16 if dtype == torch.bfloat16 else torch.float32}
    want = base.unet.state_dict()
    assert all(torch.equal(v, want[k].to(dtype)) for k, v in loaded.unet.state_dict().items())
    assert all(not m.training and not any(p.requires_grad for p in m.parameters())
               for m in (loaded.unet, loaded.vae, *loaded.text_encoders))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_single_file_round_trip(tiny_sd1, tmp_path, suffix):
    base = as_base(tiny_sd1)
    config_dir = save_config_folder(base, tmp_path / "configs")
    path = save_single_file(base, tmp_path / f"tiny{suffix}")
    if suffix == ".ckpt":
        assert set(torch.load(path, weights_only=True)) == {"state_dict"}
    keys = read_checkpoint(path).keys()
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert detect_checkpoint(keys) == ("sd1", "epsilon")
    loaded = load_base_model(str(path), config_dir=str(config_dir))
    assert (loaded.arch, loaded.prediction_type, loaded.name, loaded.source) == ("sd1", "epsilon", "tiny", str(path))
    assert_same_model(base, loaded)
    assert_frozen(loaded)


def test_sd1_single_file_loads_in_diffusers(tiny_sd1, tmp_path):
    base = as_base(tiny_sd1)
    path = save_single_file(base, tmp_path / "tiny.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(save_config_folder(base, tmp_path / "c")),
                                                    tokenizer=base.tokenizers[0], local_files_only=True)
    assert_same_model(base, pipe)


def test_sd2_single_file_round_trip(tmp_path):
    base = as_base(build_tiny("sd2"), prediction_type="v_prediction")
    path = save_single_file(base, tmp_path / "tiny2.safetensors")
    keys = read_checkpoint(path).keys()
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert detect_checkpoint(keys) == ("sd2", "v_prediction")  # the v_pred marker key
    loaded = load_base_model(str(path), config_dir=str(save_config_folder(base, tmp_path / "c")))
    assert (loaded.arch, loaded.prediction_type, loaded.tokenizers[0].pad_token) == ("sd2", "v_prediction", "!")
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert_same_model(base, loaded)


def test_sdxl_single_file_round_trip(tmp_path):
    base = as_base(tiny_sdxl_two_widths())
    config_dir = save_config_folder(base, tmp_path / "configs")
    path = save_single_file(base, tmp_path / "tinyxl.safetensors")
    assert detect_checkpoint(read_checkpoint(path).keys()) == ("sdxl", "epsilon")
    loaded = load_base_model(str(path), config_dir=str(config_dir))
    assert loaded.arch == "sdxl" and list(loaded.components()) == ["unet", "text_encoder", "text_encoder_2"]
    assert [t.pad_token for t in loaded.tokenizers] == ["<|endoftext|>", "!"]
    assert_same_model(base, loaded)  # loaded through diffusers' StableDiffusionXLPipeline.from_single_file


def _meta_model(name: str) -> tuple[UNet2DConditionModel, AutoencoderKL, list]:
    folder = CONFIGS_DIR / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if (folder / "text_encoder_2").is_dir():
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    return unet, vae, encoders


def _back_to_diffusers(encoder, ldm: dict, prefix: str) -> dict:
    if prefix.endswith(".model."):
        converted = convert_open_clip_checkpoint(encoder, ldm, prefix=prefix)
    else:
        converted = {k: v for k, v in convert_ldm_clip_checkpoint(ldm).items()
                     if k.startswith("text_model.") and prefix in ("cond_stage_model.transformer.",
                                                                   "conditioner.embedders.0.transformer.")}
    return converted if hasattr(encoder, "text_model") else {k.removeprefix("text_model."): v
                                                               for k, v in converted.items()}


@pytest.mark.parametrize("name,arch,unet_keys,prefixes", [
    ("sd1", "sd1", 686, ["cond_stage_model.transformer."]),
    ("sd2", "sd2", 686, ["cond_stage_model.model."]),
    ("sdxl", "sdxl", 1680, ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]),
])
def test_shipped_configs_give_the_real_checkpoint_layout(name, arch, unet_keys, prefixes):
    """Full-size layouts on the meta device: our LDM keys match real checkpoints and diffusers maps them back."""
    unet, vae, encoders = _meta_model(name)
    ldm = to_ldm_state_dict(arch, unet, vae, encoders, "epsilon")
    assert detect_checkpoint(ldm.keys())[0] == arch
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == unet_keys
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    for module, converted in [(unet, convert_ldm_unet_checkpoint(ldm, unet.config)),
                              (vae, convert_ldm_vae_checkpoint(ldm, vae.config))] + \
                             [(e, _back_to_diffusers(e, ldm, p)) for e, p in zip(encoders, prefixes)]:
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == v.shape for k, v in expected.items())


def test_shipped_configs_sizes():
    sizes = {}
    for name in ("sd1", "sd2", "sd2-base", "sdxl"):
        unet = json.loads((CONFIGS_DIR / name / "unet" / "config.json").read_text())
        vae = json.loads((CONFIGS_DIR / name / "vae" / "config.json").read_text())
        sizes[name] = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert sizes == {"sd1": 512, "sd2": 768, "sd2-base": 512, "sdxl": 1024}


# --- detection ------------------------------------------------------------------------------------

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_KEYS = [UNET_KEY, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
SD2_KEYS = [UNET_KEY, "cond_stage_model.model.token_embedding.weight"]
SDXL_KEYS = [UNET_KEY, "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight"]
SD2_NORM = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.mark.parametrize("keys,expected", [
    (SD1_KEYS, ("sd1", "epsilon")),
    (SD1_KEYS + ["v_pred"], ("sd1", "v_prediction")),
    (SD2_KEYS, ("sd2", "v_prediction")),
    (SD2_KEYS + ["v_pred"], ("sd2", "v_prediction")),
    (SDXL_KEYS, ("sdxl", "epsilon")),
    (SDXL_KEYS + ["v_pred"], ("sdxl", "v_prediction")),
])
def test_detect_checkpoint_from_keys(keys, expected):
    assert detect_checkpoint(keys) == expected


@pytest.mark.parametrize("spread,expected", [(0.01, "epsilon"), (0.5, "v_prediction")])
def test_detect_sd2_prediction_from_weights(spread, expected):
    tensors = {SD2_NORM: torch.randn(320, generator=torch.Generator().manual_seed(0)) * spread}
    assert detect_checkpoint(SD2_KEYS + [SD2_NORM], tensors) == ("sd2", expected)


@pytest.mark.parametrize("keys,message", [
    (["conditioner.embedders.0.model.token_embedding.weight", UNET_KEY], "refiner"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
    ([UNET_KEY], "no text encoder"),
    (["down_blocks.0.resnets.0.conv1.weight"], "down_blocks.0.resnets.0.conv1.weight"),
])
def test_detect_checkpoint_rejects(keys, message):
    with pytest.raises(TrainerError, match=message):
        detect_checkpoint(keys)


# --- prompts --------------------------------------------------------------------------------------

def test_encode_prompts_sd1_keeps_autograd(tiny_sd1):
    base = as_base(tiny_sd1)
    base.text_encoders[0].requires_grad_(True)
    out = encode_prompts(base, ["a photo of sks dog", "a cat"])
    assert set(out) == {"encoder_hidden_states"}
    assert out["encoder_hidden_states"].shape == (2, 77, 32) and out["encoder_hidden_states"].requires_grad


def test_encode_prompts_sdxl(tiny_sdxl):
    base = as_base(tiny_sdxl)
    out = encode_prompts(base, ["a photo of sks dog", "a cat"], size=24)
    assert out["encoder_hidden_states"].shape == (2, 77, 64)
    assert out["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert out["added_cond_kwargs"]["time_ids"].tolist() == [[24, 24, 0, 0, 24, 24]] * 2
    noise = base.unet(torch.zeros(2, 4, 8, 8), 10, **out).sample  # the UNet accepts the conditioning
    assert noise.shape == (2, 4, 8, 8)


# --- errors ---------------------------------------------------------------------------------------

def _write(tmp_path, name: str, data: bytes | dict | None = None):
    path = tmp_path / name
    if isinstance(data, dict):
        save_file(data, str(path))
    elif data is not None:
        path.write_bytes(data)
    else:
        path.mkdir()
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "missing.safetensors"), "does not exist"),
    (lambda d: _write(d, "broken.safetensors", b"not a checkpoint"), "cannot be read as a checkpoint"),
    (lambda d: _write(d, "broken.ckpt", b"garbage"), "cannot be read as a checkpoint"),
    (lambda d: _write(d, "notes.txt", b"hello"), "is not a checkpoint"),
    (lambda d: _write(d, "other.safetensors", {"foo.weight": torch.zeros(2)}), "Unknown checkpoint architecture"),
    (lambda d: _write(d, "empty-folder"), "is not a diffusers model"),
])
def test_load_errors_name_the_value(tmp_path, make, message):
    spec = make(tmp_path)
    with pytest.raises(TrainerError, match=message) as err:
        load_base_model(spec)
    assert spec in str(err.value)


def test_hub_id_offline_asks_for_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainerError, match="local path") as err:
        load_base_model("someone/some-sd-model")
    assert "someone/some-sd-model" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_bad_options_and_arch_mismatch(tiny_sd1, tmp_path):
    with pytest.raises(TrainerError, match="sd3"):
        load_base_model("builtin", arch="sd3")
    with pytest.raises(TrainerError, match="sampler 'plms'|Sampler 'plms'"):
        make_pipeline(as_base(tiny_sd1), "plms")
    path = save_single_file(as_base(tiny_sd1), tmp_path / "tiny.safetensors")
    with pytest.raises(TrainerError, match="arch 'sdxl'"):
        load_base_model(str(path), arch="sdxl")
