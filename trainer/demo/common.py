"""Shared pieces of the demo model's pretraining: the wall-clock LR schedule, min-SNR weights, EMA,
tensor conversions, the run log and atomic checkpoint saves."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch


BUILTIN = Path(__file__).resolve().parent.parent / "assets" / "builtin"


def lr_at(progress: float, step: int, lr: float, warmup_steps: int, min_frac: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr to lr*min_frac as progress goes 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def min_snr_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights for epsilon prediction: min(SNR, gamma) / SNR."""
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
