"""Each network type's kohya/LyCORIS parts and the PEFT layer that holds them, both ways: what a trained layer is
written as (LoRA/LoCon ``lora_down``/``lora_up``/``alpha``, DoRA ``dora_scale``, LoHa ``hada_*``, LoKr ``lokr_*``)
and how one module of a file is put back into a PEFT layer, with the weight change A1111 and ComfyUI compute."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..network.layers import adapter_parameters, kind_of

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "dora_scale")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KNOWN_PARTS = LORA_PARTS + LOHA_PARTS + LOKR_PARTS + ("alpha",)
_SPELLINGS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def part_name(part: str) -> str:
    """The kohya spelling of a module part (``lora_A.weight`` -> ``lora_down.weight``)."""
    return _SPELLINGS.get(part, part)


# --- trained layer -> file ------------------------------------------------------------------
def layer_parts(layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name`` of a PEFT layer as kohya/LyCORIS parts (``alpha`` a 0-d fp32 tensor), so that every reader's
    weight change equals PEFT's:

    - LoRA/LoCon: lora_down = A, lora_up = B, alpha; with rsLoRA alpha * sqrt(r) (readers apply alpha / r).
    - DoRA: the same plus dora_scale = PEFT's magnitude per output channel, shaped [out, 1] ([out, 1, 1, 1] for
      convs): LyCORIS' ``wd_on_output`` layout, W' = m (W + dW) / ||W + dW|| row by row.
    - LoHa: hada_w1_a/w1_b/w2_a/w2_b (and hada_t1/t2 for Tucker convs) as PEFT holds them; alpha (scale alpha / r).
    - LoKr: lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b (lokr_t2); readers apply alpha / r only when a factor
      is low-rank, so with both factors full the scale is folded into lokr_w1 and alpha is written as r.
    """
    kind = kind_of(layer, name)
    if kind in ("lora", "dora"):
        down, up = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        alpha = float(layer.lora_alpha[name])
        if layer.use_rslora.get(name, False):
            alpha *= math.sqrt(layer.r[name])
        out = {"lora_down.weight": down, "lora_up.weight": up}
        if kind == "dora":
            magnitude = layer.lora_magnitude_vector[name].weight.detach()
            out["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (down.dim() - 1))
        return {**out, "alpha": torch.tensor(alpha, dtype=torch.float32)}
    parts = {part: getattr(layer, part)[name].detach() for part in layer.adapter_layer_names
             if name in getattr(layer, part)}
    alpha, r = float(layer.alpha[name]), int(layer.r[name])
    if kind == "lokr" and "lokr_w1_b" not in parts and "lokr_w2_b" not in parts:
        parts["lokr_w1"] = parts["lokr_w1"] * (alpha / r)
        alpha = float(r)
    return {**parts, "alpha": torch.tensor(alpha, dtype=torch.float32)}


# --- file -> module -------------------------------------------------------------------------
def module_from_parts(parts: dict[str, torch.Tensor]) -> tuple[dict | None, list[str]]:
    """One file module read from its parts: (module, parts left unused) or (None, all parts) when incomplete.

    LoRA/LoCon/DoRA: {"down", "up", "alpha"} (a Tucker ``lora_mid`` folded into down; alpha = rank when absent),
    plus "dora_scale" when the magnitude is per output channel (per input channel is not something PEFT can hold,
    so it is left unused). LoHa/LoKr: {"kind", "parts", "r", "alpha"} with alpha / r = the scale readers apply.
    """
    p = dict(parts)
    alpha = p.pop("alpha", None)
    alpha = None if alpha is None else float(alpha.float().item())
    if "lora_down.weight" in p and "lora_up.weight" in p:
        down, up = p.pop("lora_down.weight"), p.pop("lora_up.weight")
        module = {"down": down, "up": up, "alpha": alpha if alpha is not None else float(down.shape[0])}
        if "lora_mid.weight" in p:   # down'[i, c, k, l] = sum_j mid[i, j, k, l] down[j, c]
            mid = p.pop("lora_mid.weight")
            module["down"] = torch.einsum("ijkl,jc->ickl", mid.float(), down.float().flatten(1)).to(down.dtype)
        scale = p.get("dora_scale")
        if scale is not None and scale.shape[0] == up.shape[0] and scale.numel() == up.shape[0]:
            module["dora_scale"] = p.pop("dora_scale")
        return module, sorted(p)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(p):
        kind, r = "loha", int(p["hada_w1_b"].shape[0])
    elif ("lokr_w1" in p or {"lokr_w1_a", "lokr_w1_b"} <= set(p)) and (
            "lokr_w2" in p or {"lokr_w2_a", "lokr_w2_b"} <= set(p)):
        kind = "lokr"
        r = int(p["lokr_w2_b"].shape[0]) if "lokr_w2_b" in p else int(p["lokr_w1_b"].shape[0]) if "lokr_w1_b" in p \
            else 0
    else:
        return None, sorted(parts)
    own = LOHA_PARTS if kind == "loha" else LOKR_PARTS
    module = {"kind": kind, "parts": {k: v for k, v in p.items() if k in own},
              "r": r or 1, "alpha": alpha if alpha is not None and r else float(r or 1)}
    return module, sorted(k for k in p if k not in own)


def module_kind(module: dict) -> str:
    """"lora", "dora", "loha" or "lokr"."""
    return module.get("kind") or ("dora" if "dora_scale" in module else "lora")


def module_rank_alpha(module: dict) -> tuple[int, float]:
    """(r, alpha) to give PEFT so that its scale alpha / r is the file's."""
    if "parts" in module:
        return module["r"], module["alpha"]
    return int(module["down"].shape[0]), float(module["alpha"])


def module_shape(module: dict) -> tuple[int, ...]:
    """The weight shape a module changes, as far as its parts tell (a 2-D shape for a conv is [out, in*kh*kw])."""
    if "parts" not in module:
        return (int(module["up"].shape[0]), *module["down"].shape[1:])
    p = module["parts"]
    if module["kind"] == "loha":
        if "hada_t1" in p:
            return (int(p["hada_w1_a"].shape[1]), int(p["hada_w1_b"].shape[1]), *p["hada_t1"].shape[2:])
        return int(p["hada_w1_a"].shape[0]), int(p["hada_w1_b"].shape[1])
    a, c = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    if "lokr_w2" in p:
        w2 = tuple(p["lokr_w2"].shape)
    elif "lokr_t2" in p:
        w2 = (p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1], *p["lokr_t2"].shape[2:])
    else:
        w2 = (p["lokr_w2_a"].shape[0], p["lokr_w2_b"].shape[1])
    return (int(a) * int(w2[0]), int(c) * int(w2[1]), *map(int, w2[2:]))


def _fit(down: torch.Tensor, up: torch.Tensor, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape kohya factors (which ``shapes_fit``) to the PEFT shapes of ``base`` (Linear/Conv2d)."""
    w = base.weight
    r = down.shape[0]
    if isinstance(base, nn.Linear):
        return down.reshape(r, w.shape[1]), up.reshape(w.shape[0], r)
    return down.reshape(r, *w.shape[1:]), up.reshape(w.shape[0], r, 1, 1)


@torch.no_grad()
def load_module(layer: nn.Module, name: str, module: dict, base: nn.Module) -> None:
    """Put a file module into adapter ``name`` of the PEFT layer injected for it (``module_kind`` and
    ``module_rank_alpha`` chose its config). LoRA/DoRA factors are copied into PEFT's; LoHa/LoKr parts replace
    PEFT's own, whatever layout PEFT chose (the file's factorisation and Tucker form are kept as they are)."""
    if "parts" not in module:
        down, up = _fit(module["down"], module["up"], base)
        layer.lora_A[name].weight.copy_(down)
        layer.lora_B[name].weight.copy_(up)
        if "dora_scale" in module:
            magnitude = layer.lora_magnitude_vector[name].weight
            magnitude.copy_(module["dora_scale"].reshape(magnitude.shape))
        return
    like = adapter_parameters(layer, name)[0]
    flag = like.requires_grad
    for part in layer.adapter_layer_names:
        container = getattr(layer, part)
        if name in container:
            del container[name]
    for part, t in module["parts"].items():
        getattr(layer, part)[name] = nn.Parameter(t.detach().to(like.device, like.dtype), requires_grad=flag)
