"""Optimizers and LR schedules by name: a small registry of optimizers (each says which package to install
when it is missing) and diffusers' ``get_scheduler`` for the schedules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import TrainConfig
from ..errors import TrainerError


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[[TrainConfig, list[dict]], torch.optim.Optimizer]
    package: str            # what `pip install` needs, "" when it ships with the trainer
    note: str


def _betas(config: TrainConfig) -> dict:
    return dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)


def _adamw(config, groups):
    # fused: one kernel for every LoRA tensor on a GPU (the CPU keeps torch's default implementation)
    on_gpu = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(groups, eps=config.adam_epsilon, **_betas(config), **({"fused": True} if on_gpu else {}))


def _adamw8bit(config, groups):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(groups, eps=config.adam_epsilon, **_betas(config))


def _adafactor(config, groups):
    from transformers.optimization import Adafactor
    # the groups' own learning rates, not Adafactor's relative step sizes
    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=config.weight_decay)


def _prodigy(config, groups):
    from prodigyopt import Prodigy
    return Prodigy(groups, eps=config.adam_epsilon, **_betas(config))


def _lion(config, groups):
    from lion_pytorch import Lion
    return Lion(groups, betas=(config.adam_beta1, 0.99), weight_decay=config.weight_decay)


def _schedule_free(config, groups):
    from schedulefree import AdamWScheduleFree
    return AdamWScheduleFree(groups, eps=config.adam_epsilon, warmup_steps=config.lr_warmup_steps,
                             **_betas(config))


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(_adamw, "", "torch AdamW"),
    "adamw8bit": OptimizerEntry(_adamw8bit, "bitsandbytes", "8-bit AdamW (CUDA)"),
    "adafactor": OptimizerEntry(_adafactor, "transformers", "Adafactor at the set learning rates"),
    "prodigy": OptimizerEntry(_prodigy, "prodigyopt", "Prodigy: set learning rates to 1.0"),
    "lion": OptimizerEntry(_lion, "lion-pytorch", "Lion: use about a tenth of the AdamW learning rate"),
    "schedule_free_adamw": OptimizerEntry(_schedule_free, "schedulefree",
                                          "schedule-free AdamW: use lr_scheduler constant"),
}


def make_optimizer(config: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``param_groups`` (each with its own "lr")."""
    entry = OPTIMIZERS.get(config.optimizer)
    if entry is None:
        raise TrainerError(f"optimizer {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}.", field="optimizer")
    try:
        return entry.build(config, param_groups)
    except ImportError:
        raise TrainerError(f"optimizer {config.optimizer!r} needs the {entry.package} package; `pip install "
                           f"{entry.package}` (or `pip install -e \".[optimizers]\"`), or use 'adamw'.",
                           field="optimizer") from None


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total: int):
    """diffusers' ``get_scheduler`` over ``total`` optimizer steps. 'constant' with warm-up steps set warms up
    (as 'constant_with_warmup'), so a warm-up is never silently ignored."""
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total,
                         num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power)


def set_training_mode(optimizer, training: bool) -> None:
    """Schedule-free optimizers keep two sets of weights: ``train()`` before steps, ``eval()`` before the
    weights are used (validation, samples, export). A no-op for every other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)   # accelerate's wrapper
    method = getattr(inner, "train" if training else "eval", None)
    if callable(method) and hasattr(inner, "train") and hasattr(inner, "eval"):
        method()
