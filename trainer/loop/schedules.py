"""Pure functions of the training maths: step counts, noise and its per-sample seeds, targets, min-SNR weights
(LR schedules come from diffusers, see ``optimizers``).

Each takes plain values or tensors and returns a value; the loop in train.py only wires them.
"""
from __future__ import annotations

import hashlib
import math

import torch


def steps_per_epoch(num_samples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (a last partial batch still counts as a micro-step)."""
    micro = math.ceil(num_samples / batch_size)
    return max(1, math.ceil(micro / grad_accum))


def total_steps(num_samples: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int) -> int:
    """``max_steps`` when set, else ``epochs`` full passes."""
    if max_steps > 0:
        return max_steps
    return epochs * steps_per_epoch(num_samples, batch_size, grad_accum)


def total_steps_for_batches(batches_per_epoch: int, grad_accum: int, epochs: int, max_steps: int) -> int:
    """``max_steps`` when set, else ``epochs`` passes over ``batches_per_epoch`` micro-batches (a last partial
    accumulation still steps the optimizer)."""
    if max_steps > 0:
        return max_steps
    return epochs * max(1, math.ceil(batches_per_epoch / grad_accum))


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant (brightness range)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset > 0:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                             device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one sample of one epoch (the same in every process and on every device)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}:noise".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generators(seed: int, epoch: int, indices: list[int], device) -> list[torch.Generator]:
    """One generator per sample of a batch, seeded by ``sample_seed``."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, epoch, i)) for i in indices]


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023); ones when gamma is 0.

    epsilon: min(snr, gamma) / snr; v-prediction: min(snr, gamma) / (snr + 1).
    """
    if gamma <= 0:
        return torch.ones_like(snr_values)
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values.clamp_min(1e-8)      # finite at SNR 0 (zero-terminal SNR)


def zero_terminal_snr_scheduler(scheduler):
    """The same schedule with betas rescaled so the last timestep has SNR 0 (Lin et al. 2024) and trailing
    timestep spacing for sampling; diffusers does the rescaling."""
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over pixels per sample, times the per-sample weight, mean over the batch (fp32)."""
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights.float()).mean()
