"""The built-in model: the small SD1-layout model shipped in ``trainer/assets/builtin`` (pretrained by
``trainer.demo.pretrain``), or, where only its configs ship, weights built once from them and cached.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "builtin"
BUILTIN_SEED = 0  # weights of the built-in model when it ships configs only
BUILTIN_WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors")



def builtin_folder() -> Path:
    """The diffusers folder to load: the shipped weights when present, else weights built once from the
    shipped configs."""
    return BUILTIN_DIR if _has_weights(BUILTIN_DIR) else _builtin_cache()


def _has_weights(folder: Path) -> bool:
    return all((folder / f).is_file() for f in BUILTIN_WEIGHTS)


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-trainer"


def _builtin_cache() -> Path:
    """Weights built from the shipped configs with a fixed seed, cached under the user cache dir."""
    digest = hashlib.sha256(str(BUILTIN_SEED).encode())
    for config in sorted(BUILTIN_DIR.glob("*/config.json")):
        digest.update(config.parent.name.encode() + config.read_bytes())
    target = _cache_root() / f"builtin-{digest.hexdigest()[:12]}"
    if not _has_weights(target):
        _build_builtin(target)
    return target


def _build_builtin(target: Path) -> None:
    """Build in a temp folder and rename it into place, so a cache folder is always complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=target.parent))
    try:
        shutil.copytree(BUILTIN_DIR, tmp, dirs_exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(BUILTIN_DIR / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(BUILTIN_DIR / "vae"))
            encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(BUILTIN_DIR / "text_encoder"))
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        encoder.save_pretrained(tmp / "text_encoder")
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        try:
            os.replace(tmp, target)
        except OSError:
            if not _has_weights(target):  # else another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
