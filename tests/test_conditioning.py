"""Text conditioning as users set it: clip skip, captions longer than 75 tokens (sd-scripts semantics),
the same encoding in preview/generation, config validation and metadata (tiny models, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.cli import main
from trainer.config import TrainConfig
from trainer.errors import ConfigError, TrainerError
from trainer.files.export import build_metadata
from trainer.models.loader import BaseModel, encode_prompts, make_pipeline
from trainer.models.text import chunk_ids, encode_text, prompt_kwargs
from trainer.render.generate import Renderer, RenderSettings

WORDS = ("cat", "dog", "red", "blue", "tree", "house", "car", "sun", "moon", "star")  # one CLIP token each


def as_base(tiny: dict) -> BaseModel:
    return BaseModel(tiny["arch"], "epsilon", tiny["unet"], tiny["vae"], tiny["text_encoders"], tiny["tokenizers"],
                     tiny["scheduler"], name="tiny", source="tiny", resolution=16)


def caption(n_tokens: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))


def old_encode_prompts(base: BaseModel, captions: list[str], size: int | None = None) -> dict:
    """encode_prompts as it was before clip skip and long captions: the reference for bit-identity."""
    def tokenize(tokenizer, device):
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    encoder = base.text_encoders[0]
    if base.arch != "sdxl":
        return {"encoder_hidden_states": encoder(tokenize(base.tokenizers[0], encoder.device))[0]}
    states, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
        out = encoder(tokenize(tokenizer, encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    size = size or base.resolution
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(captions), dtype=pooled.dtype)
    return {"encoder_hidden_states": torch.cat(states, dim=-1),
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def sd_scripts_chunks(tokenizer, text: str, max_token_length: int) -> list[list[int]]:
    """The chunk rule of sd-scripts' get_input_ids, restated: tokenize to max_token_length + 2, take 75 ids at a
    time between the first id and the last one; for pad != EOS tokenizers a full chunk ends in EOS and an
    empty one starts BOS EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_token_length + 2).input_ids
    chunks = []
    for start in range(1, max_token_length, 75):
        chunk = [ids[0], *ids[start:start + 75], ids[-1]]
        if pad != eos:
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return chunks


# --- encoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("clip_skip", [0, 1])
@pytest.mark.parametrize("text", ["a photo of sks dog", caption(110)])
def test_defaults_are_bit_identical_to_the_old_path(request, arch, clip_skip, text):
    """clip_skip 0/1 and 75 tokens: exactly today's conditioning; a long caption is truncated as today."""
    base = as_base(request.getfixturevalue(f"tiny_{arch}"))
    captions = [text, "a cat", ""]
    with torch.no_grad():
        new = encode_prompts(base, captions, size=24, clip_skip=clip_skip, max_token_length=75)
        old = old_encode_prompts(base, captions, size=24)
    assert set(new) == set(old)
    assert new["encoder_hidden_states"].shape[1] == 77
    assert torch.equal(new["encoder_hidden_states"], old["encoder_hidden_states"])
    if arch == "sdxl":
        assert set(new["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(new["added_cond_kwargs"][key], old["added_cond_kwargs"][key])


def test_clip_skip_2_is_final_norm_of_the_penultimate_layer(tiny_sd1):
    base = as_base(tiny_sd1)
    encoder, tokenizer = base.text_encoders[0], base.tokenizers[0]
    captions = ["a photo of sks dog", "a cat"]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        want = getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-2])
        got = encode_prompts(base, captions, clip_skip=2)["encoder_hidden_states"]
        last = encode_prompts(base, captions)["encoder_hidden_states"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, last, atol=1e-3)  # it really is another layer


def test_clip_skip_keeps_autograd_for_text_encoder_lora(tiny_sd1):
    base = as_base(tiny_sd1)
    base.text_encoders[0].requires_grad_(True)
    states = encode_prompts(base, [caption(100)], clip_skip=2, max_token_length=150)["encoder_hidden_states"]
    states.sum().backward()
    layers = getattr(base.text_encoders[0], "text_model", base.text_encoders[0]).encoder.layers
    assert all(p.grad is not None for p in layers[0].parameters())
    assert all(p.grad is None for p in layers[-1].parameters())  # clip skip 2 leaves the last layer out


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("max_token_length", [150, 225])
def test_chunk_ids_follow_the_sd_scripts_rule(arch, max_token_length):
    from tests.tiny_models import build_tiny
    for tokenizer in build_tiny(arch)["tokenizers"]:  # pad = EOS (SD1) and pad = "!" (SD2, SDXL encoder 2)
        for n in (0, 10, 74, 75, 76, 149, 150, 151, 224, 225, 240):
            text = caption(n)
            got = chunk_ids(tokenizer, [text], max_token_length)
            assert got.shape == (1, max_token_length // 75, 77)
            assert got[0].tolist() == sd_scripts_chunks(tokenizer, text, max_token_length), (arch, n)


def test_150_token_caption_is_encoded_in_two_chunks(tiny_sd1):
    base = as_base(tiny_sd1)
    encoder, tokenizer = base.text_encoders[0], base.tokenizers[0]
    text = caption(150)
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    assert len(tokens) == 150
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    with torch.no_grad():
        out = encode_prompts(base, [text, "a cat"], max_token_length=150)["encoder_hidden_states"]
        first = encoder(torch.tensor([[bos, *tokens[:75], eos]]))[0][0]
        second = encoder(torch.tensor([[bos, *tokens[75:], eos]]))[0][0]
        truncated = encode_prompts(base, [text])["encoder_hidden_states"][0]
    # sd-scripts' join: BOS of the first chunk, the 75 middle positions of each chunk, EOS of the last
    assert out.shape == (2, 152, 32)
    torch.testing.assert_close(out[0, :76], first[:76], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 76:151], second[1:76], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 151], second[76], rtol=0, atol=1e-6)
    torch.testing.assert_close(first, truncated, rtol=0, atol=1e-6)  # chunk 1 = the 75-token truncation


def test_sdxl_long_caption_shapes_and_pooled(tiny_sdxl):
    base = as_base(tiny_sdxl)
    captions = [caption(200), "a cat"]
    with torch.no_grad():
        out = encode_prompts(base, captions, size=24, max_token_length=225)
        short = encode_prompts(base, captions, size=24)
        noise = base.unet(torch.zeros(2, 4, 8, 8), 10, **out).sample  # the UNet takes 227 positions
    assert out["encoder_hidden_states"].shape == (2, 227, 64)
    assert out["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert out["added_cond_kwargs"]["time_ids"].tolist() == [[24, 24, 0, 0, 24, 24]] * 2
    # the pool is the first chunk's (as sd-scripts), which is the pool of the 75-token truncation
    torch.testing.assert_close(out["added_cond_kwargs"]["text_embeds"], short["added_cond_kwargs"]["text_embeds"],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out["encoder_hidden_states"][:, :76], short["encoder_hidden_states"][:, :76],
                               rtol=0, atol=1e-6)
    assert noise.shape == (2, 4, 8, 8) and torch.isfinite(noise).all()


# --- errors --------------------------------------------------------------------------------------

def test_clip_skip_on_sdxl_is_refused(tiny_sdxl):
    base = as_base(tiny_sdxl)
    with pytest.raises(TrainerError) as err:
        encode_prompts(base, ["a cat"], clip_skip=2)
    assert err.value.field == "clip_skip"
    assert "clip_skip 2" in str(err.value) and "SDXL" in str(err.value) and "set clip_skip to 0" in str(err.value)
    with torch.no_grad():  # 1 means the last layer: SDXL's normal conditioning
        assert torch.equal(encode_prompts(base, ["a cat"], clip_skip=1)["encoder_hidden_states"],
                           encode_prompts(base, ["a cat"])["encoder_hidden_states"])


@pytest.mark.parametrize("kwargs,field,words", [
    ({"max_token_length": 100}, "max_token_length", ["100", "75, 150, 225"]),
    ({"clip_skip": -1}, "clip_skip", ["-1", "between 0 and 12"]),
    ({"clip_skip": 3}, "clip_skip", ["clip_skip 3", "from 0 to 2"]),   # the tiny encoder has 2 layers
])
def test_bad_conditioning_values_name_the_field(tiny_sd1, kwargs, field, words):
    with pytest.raises(TrainerError) as err:
        encode_prompts(as_base(tiny_sd1), ["a cat"], **kwargs)
    assert err.value.field == field
    assert all(w in str(err.value) for w in words), str(err.value)


def test_config_validates_clip_skip_and_max_token_length():
    assert not {"clip_skip", "max_token_length"} & set(TrainConfig(clip_skip=2, max_token_length=225).validate())
    errors = TrainConfig(clip_skip=13, max_token_length=77).validate()
    assert "13" in errors["clip_skip"] and "between 0 and 12" in errors["clip_skip"]
    assert "77" in errors["max_token_length"] and "75, 150, 225" in errors["max_token_length"]
    with pytest.raises(ConfigError, match="clip_skip"):
        TrainConfig(clip_skip=-1).check()


def test_metadata_writes_clip_skip_and_max_token_length_as_kohya():
    def md(**overrides):
        config = TrainConfig(**overrides)
        return build_metadata(config, arch="sd1", prediction_type="epsilon", base_name="b", resolution=512,
                              num_images=1, steps=1, epoch=1, tag_frequency={}, training_started_at=0.0)
    default = md()
    assert (default["ss_clip_skip"], default["ss_max_token_length"]) == ("None", "None")
    changed = md(clip_skip=2, max_token_length=225)
    assert (changed["ss_clip_skip"], changed["ss_max_token_length"]) == ("2", "225")


# --- preview and generation ----------------------------------------------------------------------

def _render_as_before(base: BaseModel, settings: RenderSettings) -> np.ndarray:
    """Renderer.render's pipeline call before clip skip and long prompts."""
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    with torch.no_grad():
        image = make_pipeline(base)(settings.prompt, negative_prompt=settings.negative_prompt or None,
                                    num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                                    height=16, width=16, generator=generator).images[0]
    return np.asarray(image)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_short_prompt_renders_as_before(request, arch, negative):
    base = as_base(request.getfixturevalue(f"tiny_{arch}"))
    settings = RenderSettings("a red square", negative_prompt=negative, seed=3, steps=2, size=16)
    got = np.asarray(Renderer(base).render(settings))
    assert np.array_equal(got, _render_as_before(base, settings))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_embeddings_render_as_the_pipeline_encodes_text(request, arch, negative):
    """The embeddings path (used for clip skip and long prompts) conditions as the pipeline's own encoding:
    at 75 tokens the image is the same as from the prompt text."""
    base = as_base(request.getfixturevalue(f"tiny_{arch}"))
    settings = RenderSettings("a red square", negative_prompt=negative, seed=3, steps=2, size=16)
    sdxl = arch == "sdxl"
    with torch.no_grad():
        states, pooled = encode_text(base, [settings.prompt])
        kwargs = {"prompt_embeds": states, **({"pooled_prompt_embeds": pooled} if sdxl else {})}
        if negative or not sdxl:
            neg_states, neg_pooled = encode_text(base, [negative])
            kwargs["negative_prompt_embeds"] = neg_states
            if sdxl:
                kwargs["negative_pooled_prompt_embeds"] = neg_pooled
        image = make_pipeline(base)(**kwargs, num_inference_steps=2, guidance_scale=settings.guidance, height=16,
                                    width=16, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(image), _render_as_before(base, settings))


@pytest.mark.parametrize("arch,clip_skip", [("sd1", 2), ("sdxl", 0)])
def test_long_prompts_render(request, arch, clip_skip):
    base = as_base(request.getfixturevalue(f"tiny_{arch}"))
    with torch.no_grad():
        kwargs = prompt_kwargs(base, caption(120), "blurry", clip_skip=clip_skip, max_token_length=150)
    width = 64 if arch == "sdxl" else 32
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 152, width)
    renderer, calls = Renderer(base), []
    pipe = make_pipeline(base)
    renderer._pipe = lambda **kw: calls.append(kw) or pipe(**kw)
    renderer._pipe.config = pipe.config
    for negative in ("", caption(90)):
        settings = RenderSettings(caption(120), negative_prompt=negative, steps=2, size=16, clip_skip=clip_skip,
                                  max_token_length=150)
        image = renderer.render(settings)
        assert image.size == (16, 16)
        assert "prompt" not in calls[-1] and calls[-1]["prompt_embeds"].shape[1] == 152


def test_cli_generate_passes_clip_skip(tiny_sd1, tmp_path, monkeypatch, capsys):
    base = as_base(tiny_sd1)
    seen = []
    render = Renderer.render

    def spy(self, settings, loras=None):
        seen.append((settings.clip_skip, settings.max_token_length))
        return render(self, settings, loras)

    monkeypatch.setattr(Renderer, "load", classmethod(lambda cls, model, **kw: cls(base)))
    monkeypatch.setattr(Renderer, "render", spy)
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt", caption(100), "--steps", "2", "--size", "16", "--clip-skip", "2",
                 "--max-token-length", "150", "--out", str(out)]) == 0
    assert out.is_file() and seen == [(2, 150)]
    assert main(["generate", "--prompt", "a cat", "--clip-skip", "7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "clip_skip 7" in err and "Traceback" not in err
