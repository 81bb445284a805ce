"""Tiny SD1/SD2/SDXL-layout components built from configs (random weights, seeded) for tests."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "trainer" / "assets"


def tokenizer(pad: str = "<|endoftext|>") -> CLIPTokenizer:
    d = ASSETS / "clip_tokenizer"
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77, pad_token=pad)


def text_config(hidden: int, layers: int = 2, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=projection, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


def vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)


def build_tiny(arch: str = "sd1", seed: int = 0) -> dict:
    """Return {"arch", "unet", "vae", "text_encoders", "tokenizers", "scheduler"} for a tiny model.

    The UNet keeps the real block layout (DownBlock2D + 2 cross-attention levels, mirrored up
    blocks) so module names and kohya/SGM naming rules are exercised as on the full-size model.
    """
    torch.manual_seed(seed)
    common = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, attention_head_dim=4)
    if arch in ("sd1", "sd2"):
        unet = UNet2DConditionModel(layers_per_block=1, cross_attention_dim=32, **common)
        if arch == "sd2":
            unet = UNet2DConditionModel(layers_per_block=1, cross_attention_dim=32, use_linear_projection=True,
                                        **common)
        encoders = [CLIPTextModel(text_config(32))]
        tokenizers = [tokenizer("<|endoftext|>" if arch == "sd1" else "!")]
    elif arch == "sdxl":
        unet = UNet2DConditionModel(layers_per_block=2, cross_attention_dim=64, use_linear_projection=True,
                                    transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    **common)
        encoders = [CLIPTextModel(text_config(32)), CLIPTextModelWithProjection(text_config(32, projection=32))]
        tokenizers = [tokenizer(), tokenizer("!")]
    else:
        raise ValueError(arch)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return {"arch": arch, "unet": unet.eval(), "vae": vae().eval(), "text_encoders": [e.eval() for e in encoders],
            "tokenizers": tokenizers, "scheduler": scheduler}


CAPTION_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a photo of the white disc red square on blue green background small large".split())


def tiny_captioner(folder: Path, kind: str = "blip", seed: int = 0) -> Path:
    """A tiny image-to-text model (``kind`` blip or git) with its processor and a 17-word BERT tokenizer, saved
    with save_pretrained into ``folder``: what a user's downloaded captioning model folder looks like."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor, CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab-src.txt"
    vocab.write_text("\n".join(CAPTION_WORDS) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(vocab), model_max_length=32)
    vocab.unlink()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    if kind == "blip":
        text = dict(vocab_size=len(CAPTION_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                    pad_token_id=0, encoder_hidden_size=32)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
        processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                                  tokenizer=tok)
    elif kind == "git":
        model = GitForCausalLM(GitConfig(vision_config=vision, vocab_size=len(CAPTION_WORDS), hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0))
        processor = GitProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                       crop_size={"height": 32, "width": 32}),
                                 tokenizer=tok)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
