"""Base models: load SD1/SD2/SDXL (built-in, diffusers folder, single file, hub id), build pipelines,
encode prompts for training, and save single-file checkpoints (key conversion lives in ``checkpoint``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import TrainerError
from .builtin import builtin_folder
from .checkpoint import (CHECKPOINT_SUFFIXES, detect_checkpoint, read_checkpoint, to_ldm_state_dict,
                         unet_with_extras, write_checkpoint)
from .stream import stream_unet
from .text import encode_text

__all__ = ["BaseModel", "load_base_model", "detect_checkpoint", "make_pipeline", "encode_prompts",
           "save_single_file", "save_config_folder", "make_tokenizers"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CONFIGS_DIR = ASSETS / "configs"
ARCHS = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = {"dpmpp": (DPMSolverMultistepScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
            "ddim": (DDIMScheduler, {"set_alpha_to_one": False})}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class BaseModel:
    """A frozen SD model: the modules training and sampling need, plus what it is."""

    arch: str                 # "sd1" | "sd2" | "sdxl"
    prediction_type: str      # "epsilon" | "v_prediction"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list       # [CLIPTextModel] or, SDXL, [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list          # one CLIPTokenizer per encoder
    noise_scheduler: DDPMScheduler
    name: str                 # display name: file stem / folder name / hub id / "builtin"
    source: str               # what the user passed, resolved (absolute path, hub id or "builtin")
    resolution: int           # native training resolution in pixels
    is_builtin: bool = False

    def components(self) -> dict[str, torch.nn.Module]:
        """Trainable-capable modules under their diffusers pipeline names."""
        names = ("text_encoder", "text_encoder_2")
        return {"unet": self.unet, **dict(zip(names, self.text_encoders))}

    def to(self, device, dtype: torch.dtype | None = None) -> "BaseModel":
        for module in (self.unet, self.vae, *self.text_encoders):
            if dtype is None:
                module.to(device)
            else:
                module.to(device, dtype)
        return self


# --- loading -------------------------------------------------------------------------------------

def load_base_model(spec: str = "builtin", *, arch: str = "auto", prediction_type: str = "auto",
                    config_dir: str | None = None, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load a base model on the CPU, frozen and in eval mode: the UNet and text encoders in ``dtype`` (fp32 by
    default; a run that trains in bf16/fp16 loads them so, never holding an fp32 copy), the VAE in bf16 when
    ``dtype`` is bf16, else fp32.

    ``spec``: "builtin"; a diffusers folder (has model_index.json); a single-file .safetensors/.ckpt/.pt
    in the original layout; or a hub id "owner/name" (honours HF_HUB_OFFLINE). ``arch`` and
    ``prediction_type`` "auto" are detected; other values override. ``config_dir`` replaces the shipped
    config folder used to build a single-file model.
    """
    _check_choice("arch", arch, ("auto", *ARCHS))
    _check_choice("prediction_type", prediction_type, ("auto", *PREDICTION_TYPES))
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if spec == "builtin":
        base = _load_builtin(arch, prediction_type)
    elif path.is_file():
        base = _load_single_file(path.resolve(), arch, prediction_type, config_dir)
    elif path.is_dir():
        base = _load_folder(path.resolve(), arch, prediction_type, dtype)
    elif _looks_like_hub_id(spec):
        base = _load_hub(spec, arch, prediction_type, dtype)
    else:
        raise TrainerError(f"Model '{spec}' does not exist; pass 'builtin', a .safetensors/.ckpt file, a "
                           "diffusers model folder or a hub id like 'owner/name'.", field="model")
    return _freeze(base, dtype)


def _looks_like_hub_id(spec: str) -> bool:
    """"owner/name", not a relative path or a file name."""
    return bool(_HUB_ID.fullmatch(spec)) and not spec.startswith((".", "~")) \
        and Path(spec).suffix.lower() not in CHECKPOINT_SUFFIXES


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainerError(f"{field} '{value}' is not one of {', '.join(allowed)}.", field=field)


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype beside frozen weights in ``dtype``: bf16 with bf16; fp32 otherwise (the SD VAEs overflow
    in fp16)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _freeze(base: BaseModel, dtype: torch.dtype = torch.float32) -> BaseModel:
    for module in (base.unet, base.vae, *base.text_encoders):
        want = vae_dtype(dtype) if module is base.vae else dtype
        if any(p.dtype != want or p.device.type != "cpu" for p in module.parameters()):
            module.to(device="cpu", dtype=want)
        module.requires_grad_(False)
        module.eval()
    return base


def make_tokenizers(arch: str) -> list[CLIPTokenizer]:
    """CLIP tokenizers from the bundled BPE files; SD2 and SDXL's second encoder pad with "!"."""
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[arch]
    files = ASSETS / "clip_tokenizer"
    return [CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77, pad_token=pad)
            for pad in pads]


def _noise_scheduler(config, prediction_type: str) -> DDPMScheduler:
    """DDPM training scheduler from any SD scheduler config (x0 clipping off: latents are not in [-1, 1])."""
    return DDPMScheduler.from_config(config, prediction_type=prediction_type, clip_sample=False)


def _native_resolution(unet: UNet2DConditionModel, vae: AutoencoderKL) -> int:
    """The pipelines' default size: UNet latent size times the VAE downscale factor (for the shipped
    built-in configs this equals the VAE's sample_size)."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


# diffusers folders and hub ids

def _load_folder(folder: Path, arch: str, prediction_type: str, dtype: torch.dtype = torch.float32) -> BaseModel:
    if not (folder / "model_index.json").is_file():
        hint = next((f" (it holds '{f.name}': pass that file instead)" for f in sorted(folder.iterdir())
                     if f.suffix.lower() in (".safetensors", ".ckpt")), "")
        raise TrainerError(f"Folder '{folder}' is not a diffusers model: it has no model_index.json{hint}. "
                           "Pass a diffusers model folder or a single .safetensors/.ckpt file.", field="model")
    try:
        return _load_diffusers(str(folder), folder.name, str(folder), arch, prediction_type, local_only=True,
                               dtype=dtype)
    except (OSError, ValueError) as err:
        raise TrainerError(f"Folder '{folder}' could not be loaded as a diffusers model ({type(err).__name__}: "
                           f"{_first_line(err)}); check that its unet, vae and text_encoder weights are complete.",
                           field="model") from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _hub_offline() -> bool:
    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


def _load_hub(repo_id: str, arch: str, prediction_type: str, dtype: torch.dtype = torch.float32) -> BaseModel:
    offline = _hub_offline()
    try:
        return _load_diffusers(repo_id, repo_id, repo_id, arch, prediction_type, local_only=offline, dtype=dtype)
    except (OSError, ValueError) as err:
        if offline:
            raise TrainerError(f"Model '{repo_id}' is not a local path, and it cannot be fetched from the "
                               "Hugging Face hub because HF_HUB_OFFLINE is set (it is not in the local cache); "
                               "pass a local path to a .safetensors file or a diffusers folder.",
                               field="model") from err
        raise TrainerError(f"Model '{repo_id}' is not a local path and could not be loaded from the Hugging Face "
                           f"hub ({type(err).__name__}: {_first_line(err)}); check the id and your connection, or "
                           "pass a local path to a .safetensors file or a diffusers folder.", field="model") from err


def _load_diffusers(source: str, name: str, resolved: str, arch: str, prediction_type: str, *,
                    local_only: bool, is_builtin: bool = False, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load each component of a diffusers SD/SDXL layout (local folder or hub repo) by subfolder."""
    index = DiffusionPipeline.load_config(source, local_files_only=local_only)
    if "unet" not in index or "text_encoder" not in index:
        raise TrainerError(f"Model '{name}' is a {index.get('_class_name', 'unknown')} model; only Stable "
                           "Diffusion 1.x, 2.x and SDXL (a unet and a text_encoder) are supported.", field="model")
    sdxl = "text_encoder_2" in index
    kwargs = {"local_files_only": local_only}
    unet = None
    if dtype != torch.float32 and (Path(source) / "unet").is_dir():   # half-precision run: no fp32 copy held
        unet = stream_unet(Path(source) / "unet", dtype)
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype(dtype), **kwargs)
    encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)]
    if sdxl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                    dtype=dtype, **kwargs))
    detected = "sdxl" if sdxl else ("sd2" if unet.config.get("use_linear_projection") else "sd1")
    arch = _resolve_arch(arch, detected, name)
    scheduler_config = DDPMScheduler.load_config(source, subfolder="scheduler", **kwargs)
    if prediction_type == "auto":
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
    return BaseModel(arch=arch, prediction_type=prediction_type, unet=unet, vae=vae, text_encoders=encoders,
                     tokenizers=_folder_tokenizers(source, index, arch, local_only),
                     noise_scheduler=_noise_scheduler(scheduler_config, prediction_type), name=name, source=resolved,
                     resolution=_native_resolution(unet, vae), is_builtin=is_builtin)


def _resolve_arch(requested: str, detected: str, name: str) -> str:
    """An explicit arch wins, but SDXL (two encoders) and SD1/SD2 (one) cannot stand in for each other."""
    if requested == "auto":
        return detected
    if (requested == "sdxl") != (detected == "sdxl"):
        raise TrainerError(f"Model '{name}' is an {detected} model but arch '{requested}' was requested; "
                           f"set arch to auto or {detected}.", field="arch")
    return requested


def _folder_tokenizers(source: str, index: dict, arch: str, local_only: bool) -> list[CLIPTokenizer]:
    """The model's own tokenizers when it ships them, else the bundled CLIP tokenizer."""
    names = ["tokenizer", "tokenizer_2"][: 2 if arch == "sdxl" else 1]
    if not all(index.get(n, [None])[0] for n in names):
        return make_tokenizers(arch)
    try:
        return [CLIPTokenizer.from_pretrained(source, subfolder=n, local_files_only=local_only) for n in names]
    except (OSError, ValueError):
        return make_tokenizers(arch)


# the built-in model

def _load_builtin(arch: str, prediction_type: str) -> BaseModel:
    return _load_diffusers(str(builtin_folder()), "builtin", "builtin", arch, prediction_type, local_only=True,
                           is_builtin=True)


# single files

def _load_single_file(path: Path, arch: str, prediction_type: str, config_dir: str | None) -> BaseModel:
    arch, prediction_type = _single_file_kind(path, arch, prediction_type)
    folder = Path(config_dir) if config_dir else _shipped_config(arch, prediction_type)
    if not (folder / "model_index.json").is_file():
        raise TrainerError(f"Config folder '{folder}' has no model_index.json; pass a diffusers config folder "
                           f"matching this {arch} checkpoint.", field="model")
    pipe = _single_file_pipeline(path, arch, folder)
    sdxl = arch == "sdxl"
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    for label, module in [("unet", pipe.unet), ("vae", pipe.vae)] + [("text encoder", e) for e in encoders]:
        if any(p.device.type == "meta" for p in module.parameters()):  # diffusers leaves missing weights on meta
            raise TrainerError(f"Model file '{path.name}' has no complete {label} for the {arch} configs in "
                               f"'{folder}'; it may be pruned, or pass a config_dir that matches it.", field="model")
    return BaseModel(arch=arch, prediction_type=prediction_type, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders,
                     tokenizers=[pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer],
                     noise_scheduler=_noise_scheduler(pipe.scheduler.config, prediction_type), name=path.stem,
                     source=str(path), resolution=_native_resolution(pipe.unet, pipe.vae))


def _single_file_kind(path: Path, arch: str, prediction_type: str) -> tuple[str, str]:
    """Detected (arch, prediction type); an explicit prediction type wins, an explicit arch must match."""
    tensors = read_checkpoint(path)
    try:
        detected_arch, detected_prediction = detect_checkpoint(tensors.keys(), tensors)
    except TrainerError as err:
        raise TrainerError(f"Model file '{path}': {err}", field="model") from err
    if arch not in ("auto", detected_arch):
        raise TrainerError(f"Model file '{path.name}' holds an {detected_arch} checkpoint but arch '{arch}' was "
                           f"requested; set arch to auto or {detected_arch}.", field="arch")
    return detected_arch, detected_prediction if prediction_type == "auto" else prediction_type


def _shipped_config(arch: str, prediction_type: str) -> Path:
    """SD2 has two shipped layouts: 768 v-prediction ("sd2") and 512 epsilon ("sd2-base")."""
    name = "sd2-base" if arch == "sd2" and prediction_type == "epsilon" else arch
    return CONFIGS_DIR / name


def _single_file_pipeline(path: Path, arch: str, folder: Path) -> DiffusionPipeline:
    """diffusers' own single-file conversion, offline, with our configs and tokenizers."""
    tokenizers = make_tokenizers(arch)
    if arch == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {"tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1]}
    else:
        cls, extra = StableDiffusionPipeline, {"tokenizer": tokenizers[0], "safety_checker": None,
                                               "feature_extractor": None}
    unet = unet_with_extras(read_checkpoint(path), UNet2DConditionModel.load_config(folder / "unet"))
    if unet is not None:
        extra["unet"] = unet
    try:
        return cls.from_single_file(str(path), config=str(folder), local_files_only=True,
                                    torch_dtype=torch.float32, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise TrainerError(f"Model file '{path.name}' could not be loaded as {arch} with the configs in '{folder}' "
                           f"({type(err).__name__}: {_first_line(err)}); the file may be damaged, or pass a config_dir "
                           "that matches it.",
                           field="model") from err


# --- using a model --------------------------------------------------------------------------------

def _pipeline(base: BaseModel, scheduler) -> DiffusionPipeline:
    if base.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                         text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                         tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                       unet=base.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_pipeline(base: BaseModel, sampler: str = "dpmpp") -> DiffusionPipeline:
    """An SD/SDXL pipeline sharing ``base``'s modules; ``sampler`` is "dpmpp", "euler" or "ddim"."""
    if sampler not in SAMPLERS:
        raise TrainerError(f"Sampler '{sampler}' is not one of {', '.join(SAMPLERS)}.", field="sampler")
    cls, overrides = SAMPLERS[sampler]
    return _pipeline(base, cls.from_config(base.noise_scheduler.config, **overrides))


def encode_prompts(base: BaseModel, captions: list[str], *, size: int | None = None, clip_skip: int = 0,
                   max_token_length: int = 75) -> dict:
    """UNet conditioning for a batch of captions, with autograd (text-encoder LoRA may be training).

    SD1/SD2: ``{"encoder_hidden_states"}`` = the encoder's last hidden state (as the SD pipelines), or with
    ``clip_skip`` N >= 2 the final-normed state N layers from the end. SDXL: penultimate hidden states of both
    encoders concatenated, plus ``added_cond_kwargs`` with the pooled projection of encoder 2 and time ids
    (size, size, 0, 0, size, size). ``max_token_length`` 150/225 encodes captions in chunks of 75 tokens
    (sequence length 152/227); see ``text.encode_text``.
    """
    states, pooled = encode_text(base, captions, clip_skip=clip_skip, max_token_length=max_token_length)
    if base.arch != "sdxl":
        return {"encoder_hidden_states": states}
    size = size or base.resolution
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(states), dtype=pooled.dtype,
                            device=pooled.device)
    return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


# --- saving ---------------------------------------------------------------------------------------

def save_single_file(base: BaseModel, path: str | Path) -> Path:
    """Write ``base`` as one original-layout checkpoint (.safetensors, or .ckpt/.pt as {"state_dict": ...}).

    SD2's OpenCLIP encoder is written with the 23 layers diffusers keeps (the 24th is unused by SD2) and
    without ``text_projection``; v-prediction models get a ``v_pred`` marker key.
    """
    state = to_ldm_state_dict(base.arch, base.unet, base.vae, base.text_encoders, base.prediction_type)
    return write_checkpoint(state, Path(path))


def save_config_folder(base: BaseModel, folder: str | Path) -> Path:
    """Write the diffusers configs (no weights) that describe ``base``: a ``config_dir`` for its single file."""
    folder = Path(folder)
    scheduler = DDPMScheduler.from_config(base.noise_scheduler.config)  # the pipeline may patch its config
    _pipeline(base, scheduler).save_config(folder)
    base.unet.save_config(folder / "unet")
    base.vae.save_config(folder / "vae")
    scheduler.save_config(folder / "scheduler")
    for name, encoder in zip(("text_encoder", "text_encoder_2"), base.text_encoders):
        encoder.config.save_pretrained(folder / name)
    return folder
