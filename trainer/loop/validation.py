"""Validation loss: images held out of training (a seeded share of the dataset, or a folder of their own),
scored at fixed timesteps with fixed noise, so two evaluations differ only by the weights and the curve
means something (as SimpleTuner and sd-scripts do).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data.buckets import BucketSpec
from ..data.dataset import LoraDataset
from ..data.scan import DatasetReport, scan_dataset
from ..errors import TrainerError
from ..models.loader import BaseModel, encode_prompts
from . import schedules

TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)   # of num_train_timesteps, the same at every evaluation
EVALUATIONS_PER_RUN = 10                           # when validate_every_n_steps is 0


def split_report(report: DatasetReport, config: TrainConfig) -> tuple[DatasetReport, DatasetReport | None]:
    """(training report, validation report or None). ``validation_split`` < 1 is a fraction of the images,
    >= 1 a count, drawn with the run's seed; ``validation_dir`` is a separate folder scanned like the data."""
    if config.validation_dir:
        try:
            held = scan_dataset(config.validation_dir, trigger_word=config.trigger_word,
                                resolution=config.resolution, caption_extension=config.caption_extension)
        except TrainerError as err:
            raise TrainerError(f"validation_dir: {err}", field="validation_dir") from None
        if not held.items:
            raise TrainerError(f"validation_dir '{config.validation_dir}' has no readable images; add some or "
                               "clear validation_dir.", field="validation_dir")
        return report, held
    if not config.validation_split:
        return report, None
    n_items = len(report.items)
    n_held = (int(config.validation_split) if config.validation_split >= 1
              else max(1, round(config.validation_split * n_items)))
    if n_held >= n_items:
        raise TrainerError(f"validation_split {config.validation_split:g} holds out {n_held} of the {n_items} "
                           "image(s) and leaves none to train on; use a smaller share (e.g. 0.1) or add images.",
                           field="validation_split")
    held_idx = set(random.Random(f"{config.seed}:validation").sample(range(n_items), n_held))
    keep = [item for i, item in enumerate(report.items) if i not in held_idx]
    held = [item for i, item in enumerate(report.items) if i in held_idx]
    return (dataclasses.replace(report, items=keep, num_images=len(keep)),
            dataclasses.replace(report, items=held, num_images=len(held)))


def every_n_steps(config: TrainConfig, total: int) -> int:
    return config.validate_every_n_steps or max(1, total // EVALUATIONS_PER_RUN)


@dataclass
class ValidationSet:
    """Everything fixed about the evaluation: latents (VAE mean), captions, size ids, timesteps, noise."""

    latents: list[torch.Tensor]        # per image [1, C, h, w], scaled
    captions: list[str]
    time_ids: list[torch.Tensor]       # per image [6]
    timesteps: torch.Tensor            # [T]
    noise: list[torch.Tensor]          # per image [T, C, h, w]

    def __len__(self) -> int:
        return len(self.captions)


@torch.no_grad()
def build_validation_set(report: DatasetReport, config: TrainConfig, base: BaseModel, device,
                         buckets: BucketSpec | None) -> ValidationSet:
    """Centre-cropped, unflipped, full captions; noise drawn on the CPU from (seed, image) so it is the same
    on every device."""
    ds = LoraDataset(report, config.resolution, buckets=buckets)
    n_train = base.noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor([int(f * n_train) for f in TIMESTEP_FRACTIONS], device=device)
    latents, noise, time_ids = [], [], []
    for i in range(len(ds.items)):
        sample = ds[i]
        pixels = sample["pixel_values"][None].to(device, dtype=base.vae.dtype)
        mean = base.vae.encode(pixels).latent_dist.mean
        cfg = base.vae.config
        z = ((mean - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).float()
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + i)
        latents.append(z)
        noise.append(torch.randn((len(timesteps), *z.shape[1:]), generator=g).to(device))
        time_ids.append(sample["time_ids"])
    return ValidationSet(latents, [item.caption for item in ds.items], time_ids, timesteps, noise)


@torch.no_grad()
def validation_loss(vset: ValidationSet, base: BaseModel, unet, config: TrainConfig,
                    weight_dtype: torch.dtype, device) -> float:
    """Mean MSE over the held-out images x the fixed timesteps (no loss weighting)."""
    scheduler, total = base.noise_scheduler, 0.0
    t = vset.timesteps
    for z, noise, caption, ids in zip(vset.latents, vset.noise, vset.captions, vset.time_ids):
        latents = z.expand(len(t), *z.shape[1:]).to(weight_dtype)
        noisy = scheduler.add_noise(latents, noise.to(weight_dtype), t)
        cond = encode_prompts(base, [caption] * len(t), size=config.resolution,
                           **config.text_encoding)
        extra = cond.get("added_cond_kwargs")
        if extra is not None:
            extra = {**extra, "time_ids": ids.expand(len(t), -1).to(device, dtype=extra["time_ids"].dtype)}
        with torch.autocast(device_type=device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            pred = unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"].to(weight_dtype),
                        added_cond_kwargs=extra).sample
        target = schedules.training_target(scheduler, latents, noise.to(weight_dtype), t, base.prediction_type)
        total += torch.nn.functional.mse_loss(pred.float(), target.float()).item()
    return total / len(vset)
