"""The rules a TrainConfig must meet: ``config_errors`` returns ``{field: message}`` for every invalid field,
each message naming the value and the fix (``TrainConfig.validate`` calls it).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import CONV_TARGETS, TrainConfig


def config_errors(cfg: TrainConfig) -> dict[str, str]:
    """Return ``{field: message}`` for every invalid field (empty when valid)."""
    e: dict[str, str] = {}

    for f in dataclasses.fields(cfg):
        options, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if options and value not in options:
            e[f.name] = f"{value!r} is not one of {', '.join(options)}; pick one of those."
    if not str(cfg.model).strip():
        e["model"] = "is empty; give 'builtin', a model folder, a checkpoint file or a hub id."
    if not 0 <= cfg.clip_skip <= 12:
        e["clip_skip"] = f"{cfg.clip_skip} must be between 0 and 12; use 0 (off) or 2 (usual for anime models)."
    if cfg.max_token_length not in (75, 150, 225):
        e["max_token_length"] = (f"{cfg.max_token_length} is not one of 75, 150, 225; use 75, or 150/225 "
                                 "for captions longer than 75 tokens.")
    if cfg.resolution != 0 and (cfg.resolution < 64 or cfg.resolution % 8):
        e["resolution"] = (f"{cfg.resolution} must be a multiple of 8 and at least 64 (or 0 for the "
                           f"model's native size); try {max(64, (cfg.resolution + 7) // 8 * 8)}.")
    if cfg.clip_model.strip() and not (Path(cfg.clip_model).expanduser() / "config.json").is_file():
        e["clip_model"] = (f"'{cfg.clip_model}' is not a local model folder (no config.json); give a folder of a "
                           "CLIP model saved with transformers, or leave it empty.")
    e.update(_bucket_errors(cfg))
    e.update(_validation_errors(cfg))
    if not 0 <= cfg.ema_decay < 1:
        e["ema_decay"] = f"{cfg.ema_decay} must be in [0, 1); 0.999 is typical, 0 turns EMA off."
    if cfg.prior_loss_weight < 0:
        e["prior_loss_weight"] = f"{cfg.prior_loss_weight} must be 0 or more; 1.0 is the usual value."
    if cfg.rank < 1:
        e["rank"] = f"{cfg.rank} must be 1 or more; 16 is a good start."
    if cfg.alpha <= 0:
        e["alpha"] = f"{cfg.alpha} must be greater than 0; use rank/2 ({max(1, cfg.rank) / 2:g}) or 1."
    if cfg.text_encoder_rank < 0:
        e["text_encoder_rank"] = f"{cfg.text_encoder_rank} must be 0 (same as rank) or more."
    if cfg.text_encoder_alpha < 0:
        e["text_encoder_alpha"] = f"{cfg.text_encoder_alpha} must be 0 (same as alpha) or more."
    if cfg.conv_rank < 0 or cfg.conv_alpha < 0:
        e["conv_rank" if cfg.conv_rank < 0 else "conv_alpha"] = "must be 0 (off / same as conv_rank) or more."
    both = sorted(set(cfg.unet_targets) & set(CONV_TARGETS)) if cfg.conv_rank else []
    if both:
        e["unet_targets"] = (f"lists conv modules ({', '.join(both)}) while conv_rank is set; leave convs to "
                             "the conv group or set conv_rank to 0.")
    if cfg.use_rslora and cfg.network in ("loha", "lokr"):
        e["use_rslora"] = (f"rank-stabilised scaling is for lora/dora, not {cfg.network}; turn use_rslora off "
                           "or pick network lora or dora.")
    if cfg.export_diffusers and cfg.network in ("loha", "lokr"):
        e["export_diffusers"] = (f"diffusers cannot load {cfg.network} networks (LoRA/DoRA only); turn "
                                 "export_diffusers off, or pick network lora or dora.")
    if cfg.projector_rank < 0:
        e["projector_rank"] = f"{cfg.projector_rank} must be 0 (same as rank) or more."
    if cfg.projector_alpha < 0:
        e["projector_alpha"] = f"{cfg.projector_alpha} must be 0 (same as alpha) or more."
    for name in ("learning_rate", "text_encoder_lr", "projector_lr"):
        v = getattr(cfg, name)
        if not (0 < v < 1):
            e[name] = f"{v} must be between 0 and 1; 1e-4 is typical for the UNet, 5e-5 for text encoders."
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "repeats", "sample_steps"):
        if getattr(cfg, name) < 1:
            e[name] = f"{getattr(cfg, name)} must be 1 or more."
    if cfg.cpu_threads < 0:
        e["cpu_threads"] = f"{cfg.cpu_threads} must be 0 (automatic) or a number of threads."
    if cfg.keep_checkpoints < 1:
        e["keep_checkpoints"] = f"{cfg.keep_checkpoints} must be 1 or more; 2 is a good choice."
    for name in ("max_train_steps", "lr_warmup_steps", "save_every_n_steps", "sample_every_n_steps",
                 "checkpoint_every_n_steps"):
        if getattr(cfg, name) < 0:
            e[name] = f"{getattr(cfg, name)} must be 0 or more."
    if not (0 <= cfg.caption_dropout < 1):
        e["caption_dropout"] = f"{cfg.caption_dropout} must be in [0, 1); 0.05-0.1 is typical."
    if cfg.keep_tokens < 0:
        e["keep_tokens"] = f"{cfg.keep_tokens} must be 0 or more; 1 keeps the trigger word first."
    if not (0 <= cfg.tag_dropout < 1):
        e["tag_dropout"] = f"{cfg.tag_dropout} must be in [0, 1); 0 turns it off, 0.1 is typical."
    ext = cfg.caption_extension
    if not ext.startswith(".") or len(ext) < 2 or any(c in ext for c in "/\\"):
        e["caption_extension"] = (f"{ext!r} is not a file extension; give one that starts with '.' and has "
                                  "no '/' or '\\', e.g. '.txt' or '.caption'.")
    for name in ("min_snr_gamma", "noise_offset", "weight_decay", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            e[name] = f"{getattr(cfg, name)} must be 0 or more (0 disables it)."
    if not (cfg.train_unet or cfg.train_text_encoder or cfg.train_projector):
        e["train_unet"] = "nothing to train: enable train_unet, train_text_encoder or train_projector."
    if cfg.train_unet and not cfg.unet_targets:
        e["unet_targets"] = "is empty; list module names such as attn2.to_q."
    if cfg.train_text_encoder and not cfg.text_encoder_targets:
        e["text_encoder_targets"] = "is empty; list module names such as self_attn.q_proj."
    if not cfg.name.strip() or any(c in cfg.name for c in '/\\:*?"<>|'):
        e["name"] = f"{cfg.name!r} is not a usable file name; use letters, digits, '-' or '_'."
    if cfg.sample_every_n_steps and not cfg.sample_prompts:
        e["sample_prompts"] = "is empty while sample_every_n_steps is set; add a prompt or set it to 0."
    return e

def _bucket_errors(cfg: TrainConfig) -> dict[str, str]:
    e: dict[str, str] = {}
    if cfg.bucket_step and (cfg.bucket_step < 8 or cfg.bucket_step % 8):
        e["bucket_step"] = f"{cfg.bucket_step} must be a multiple of 8 (or 0 for automatic); try 64."
    for name in ("min_bucket_reso", "max_bucket_reso"):
        v = getattr(cfg, name)
        if v and (v < 8 or v % 8):
            e[name] = f"{v} must be 0 (automatic) or a multiple of 8; try {max(8, (v + 7) // 8 * 8)}."
    if cfg.min_bucket_reso and cfg.max_bucket_reso and cfg.min_bucket_reso > cfg.max_bucket_reso:
        e["min_bucket_reso"] = (f"{cfg.min_bucket_reso} is larger than max_bucket_reso "
                                f"({cfg.max_bucket_reso}); lower it or raise max_bucket_reso.")
    if cfg.resolution and cfg.max_bucket_reso and cfg.max_bucket_reso < cfg.resolution:
        e["max_bucket_reso"] = (f"{cfg.max_bucket_reso} is smaller than the resolution ({cfg.resolution}); "
                                "set it to 0 (twice the resolution) or at least the resolution.")
    return e

def _validation_errors(cfg: TrainConfig) -> dict[str, str]:
    e: dict[str, str] = {}
    v = cfg.validation_split
    if v < 0 or (v >= 1 and not float(v).is_integer()):
        e["validation_split"] = (f"{v:g} must be a share below 1 (e.g. 0.1), a whole count (e.g. 5) or 0 "
                                 "(no validation).")
    if v and cfg.validation_dir.strip():
        e["validation_dir"] = ("is set together with validation_split; use one: clear validation_dir or set "
                               "validation_split to 0.")
    if cfg.validate_every_n_steps < 0:
        e["validate_every_n_steps"] = f"{cfg.validate_every_n_steps} must be 0 (automatic) or more."
    return e
