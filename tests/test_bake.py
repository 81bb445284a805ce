"""Baking: a LoRA merged into a tiny SD1 model, written as a diffusers folder and as a single LDM-layout file, loads
back (our loader, diffusers' from_single_file) and renders what the unmerged adapter renders at that weight."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from tests.test_export import trained
from tests.test_models import as_base, assert_same_model
from tests.tiny_models import build_tiny
from trainer.errors import TrainerError
from trainer.files.bake import bake
from trainer.files.export import lora_state_dict, save_adapter
from trainer.models.checkpoint import read_checkpoint
from trainer.models.loader import load_base_model, make_pipeline, save_config_folder
from trainer.render.generate import RenderSettings, Renderer

WEIGHT = 0.7
SETTINGS = RenderSettings(prompt="a red square on a white background", seed=2, steps=2, guidance=4.0,
                          output_type="np")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny SD1 model as a diffusers folder, its config folder, a LoRA (UNet incl. 3x3 convs and text
    encoder) and the image the unmerged adapter renders at WEIGHT."""
    d = tmp_path_factory.mktemp("bake")
    make_pipeline(as_base(build_tiny("sd1"))).save_pretrained(d / "base")
    configs = save_config_folder(load_base_model(str(d / "base")), d / "configs")   # its scheduler too
    comps, _, _ = trained("sd1", rank=4, alpha=2.0, seed=7, extra_targets=("proj_in", "ff.net.2", "conv1"))
    lora = save_adapter(d / "lora.safetensors", lora_state_dict(comps, "sd1"), {}, dtype=torch.float32)
    renderer = Renderer(load_base_model(str(d / "base")))
    want = torch.from_numpy(renderer.render(SETTINGS, {str(lora): WEIGHT}))
    plain = torch.from_numpy(renderer.render(SETTINGS, {str(lora): 0.0}))
    assert (want - plain).abs().max() > 1e-2          # the adapter shows: equality below means something
    return d, configs, lora, want


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bake_to_a_diffusers_folder_renders_as_the_unmerged_adapter(model):
    d, _, lora, want = model
    result = bake(str(d / "base"), [(lora, WEIGHT)], d / "baked")
    assert result.kind == "diffusers folder" and result.merged[0]["modules"] == len(load_file(lora)) // 3
    assert (d / "baked" / "model_index.json").is_file()
    got = torch.from_numpy(Renderer(load_base_model(str(d / "baked"))).render(SETTINGS))
    err = rel(got, want)
    print(f"bake -> diffusers folder: relative difference {err:.2e}")
    assert err < 1e-5
    with pytest.raises(TrainerError, match="already exists"):
        bake(str(d / "base"), [(lora, WEIGHT)], d / "baked")


def test_bake_to_a_single_file_loads_in_our_loader_and_diffusers(model):
    d, configs, lora, want = model
    result = bake(str(d / "base"), [(lora, WEIGHT)], d / "baked.safetensors")
    assert result.kind == "single file"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in read_checkpoint(result.path))
    loaded = load_base_model(str(result.path), config_dir=str(configs))
    got = torch.from_numpy(Renderer(loaded).render(SETTINGS))
    err = rel(got, want)
    print(f"bake -> single file: relative difference {err:.2e}")
    assert err < 1e-5
    pipe = StableDiffusionPipeline.from_single_file(str(result.path), config=str(configs),
                                                    tokenizer=loaded.tokenizers[0], local_files_only=True)
    assert_same_model(loaded, pipe)
    half = bake(str(d / "base"), [(lora, WEIGHT)], d / "half.safetensors", dtype="fp16")
    assert {t.dtype for t in read_checkpoint(half.path).values()} == {torch.float16}
