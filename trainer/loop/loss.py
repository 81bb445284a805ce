"""The loss of one micro-batch: latents (encoded now or from the cache), per-sample seeded noise and timestep,
the UNet's prediction against the schedule's target, min-SNR and regularisation weights.
"""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..config import TrainConfig
from ..data.cache import TextCache
from ..models.loader import BaseModel, encode_prompts
from . import schedules


def diffusion_loss(base: BaseModel, unet, batch: dict, config: TrainConfig, scheduler, alphas_cumprod,
                   noise_gen: torch.Generator | None, weight_dtype: torch.dtype, device,
                   text_cache: TextCache | None = None) -> torch.Tensor:
    """The loss of one micro-batch: encode images and captions (or read their caches), add noise, predict,
    weighted MSE. SDXL is conditioned on each image's own size and crop (``batch["time_ids"]``).

    Randomness (VAE sample, noise, timestep) comes from ``noise_gen`` when given, else from one generator
    per sample seeded by (seed, epoch, sample index), so a sample's noise does not depend on the batch it is
    in, on the steps before it, or on the process it runs in: resumed and multi-process runs match.
    """
    with torch.no_grad():
        if "latent_params" in batch:  # cached moments: the same sample as encoding now
            moments = batch["latent_params"].to(device, dtype=base.vae.dtype)
        else:
            moments = base.vae.encode(batch["pixel_values"].to(device, dtype=base.vae.dtype)).latent_dist.parameters
        gens = ([noise_gen] if noise_gen is not None
                else schedules.sample_generators(config.seed, batch["epoch"], batch["indices"], device))
        parts = [moments] if noise_gen is not None else moments.split(1)
        samples = [DiagonalGaussianDistribution(m).sample(generator=g) for m, g in zip(parts, gens)]
        latents = _vae_scale(base, torch.cat(samples)).to(weight_dtype)
    lat_parts = [latents] if noise_gen is not None else latents.split(1)
    noise = torch.cat([schedules.sample_noise(z, config.noise_offset, g) for z, g in zip(lat_parts, gens)])
    timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=g,
                                         device=device) for z, g in zip(lat_parts, gens)])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    cond = (text_cache.encode(batch["captions"]) if text_cache is not None
            else encode_prompts(base, batch["captions"], size=config.resolution,
                           **config.text_encoding))
    if "added_cond_kwargs" in cond and "time_ids" in batch:
        extra = cond["added_cond_kwargs"]
        cond["added_cond_kwargs"] = {**extra, "time_ids": batch["time_ids"].to(device, dtype=extra["time_ids"].dtype)}
    with torch.autocast(device_type=device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
        pred = unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(weight_dtype),
                    added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    target = schedules.training_target(scheduler, latents, noise, timesteps, base.prediction_type)
    weights = schedules.min_snr_weights(schedules.snr(alphas_cumprod, timesteps), config.min_snr_gamma,
                                        base.prediction_type)
    if "loss_weights" in batch:   # prior_loss_weight on regularisation samples
        weights = weights * batch["loss_weights"].to(weights.device)
    return schedules.weighted_mse(pred, target, weights)


def _vae_scale(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    cfg = base.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (latents - shift) * cfg.scaling_factor
