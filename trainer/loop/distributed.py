"""Several processes training one run (``torchrun`` / ``accelerate launch``): which process is the main one,
and the few collectives the loop needs: summing gradients and losses, agreeing on stop/save requests, and a
barrier. With one process every function is a no-op, so the loop reads the same either way.
"""
from __future__ import annotations

import os

import torch


def rank() -> int:
    """This process's rank, from the launcher's environment (0 when not launched as several)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the processes, in one flat all-reduce (a process whose share of
    the batch was empty contributes zeros). Losses are pre-divided by the global batch size, so the sum is
    the gradient of the global batch's mean loss, as one process with the whole batch computes it."""
    if not _active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def sum_value(value: float, device) -> float:
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def agree(flag: bool, device) -> bool:
    """True on every process when it is True on any (a stop request seen by one process stops all, at the
    same step)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if _active():
        torch.distributed.barrier()
