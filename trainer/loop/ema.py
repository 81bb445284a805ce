"""Exponential moving average of the trainable (LoRA) weights: updated after every optimizer step, kept in fp32
on the training device or the CPU, swapped in for export, and part of the resumable state.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class Ema:
    """``shadow = decay * shadow + (1 - decay) * weight`` after each optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, device: str | torch.device | None = None):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().to(device or p.device, dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.device, dtype=torch.float32), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the duration (e.g. an export), the live ones back afterwards."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.device, dtype=p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(live, self.params):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the network {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(state[str(i)].to(s.device, dtype=s.dtype))
