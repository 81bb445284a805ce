"""Every network type a LoRA file can hold (LoRA, LoCon with or without a Tucker mid, DoRA, LoHa, LoKr) read per
module, with its weight change dW as A1111 and ComfyUI compute it (comfy/weight_adapter/{lora,loha,lokr,base}.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TrainerError
from .adapters import _PEFT_COMPONENTS, _load, _peft_to_modules

# kohya-named parts each network type stores under ``<module>.``
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KNOWN_PARTS = LORA_PARTS + LOHA_PARTS + LOKR_PARTS + ("alpha", "dora_scale")
TYPE_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}


@dataclass
class Net:
    """One module of a network file: its parts (``lora_down.weight``, ``hada_w1_a``, ...) and alpha (None: absent)."""

    name: str
    parts: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def kind(self) -> str:
        """"lora", "locon" (a kernel wider than 1x1 or a Tucker mid), "loha" or "lokr"."""
        if "hada_w1_a" in self.parts:
            return "loha"
        if any(p.startswith("lokr_") for p in self.parts):
            return "lokr"
        down = self.parts["lora_down.weight"]
        return "locon" if "lora_mid.weight" in self.parts or (down.dim() == 4 and down.shape[2:] != (1, 1)) \
            else "lora"

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.parts

    @property
    def label(self) -> str:
        """"LoRA", "LoCon", "LoHa", "LoKr"; "DoRA" for a LoRA/LoCon with a magnitude, "LoHa+DoRA" etc. otherwise."""
        kind = TYPE_LABELS[self.kind]
        if not self.dora:
            return kind
        return "DoRA" if self.kind in ("lora", "locon") else f"{kind}+DoRA"

    @property
    def rank(self) -> int:
        """The rank alpha is divided by (LoKr: of its last low-rank factor; 0 when both factors are full)."""
        p = self.parts
        if self.kind in ("lora", "locon"):
            return int(p["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        if "lokr_w2_b" in p:
            return int(p["lokr_w2_b"].shape[0])
        return int(p["lokr_w1_b"].shape[0]) if "lokr_w1_b" in p else 0

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without an alpha (or for a LoKr with no low-rank factor)."""
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight shape this module changes, as far as the file tells (LoHa/LoKr convs may read 2-D)."""
        p = self.parts
        if self.kind in ("lora", "locon"):
            down = self.factors()[1]
            return (int(p["lora_up.weight"].shape[0]), *down.shape[1:])
        return tuple(self._structure().shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up ``[out, r]``, down ``[r, in]`` or ``[r, in, kh, kw]``) of a LoRA/LoCon, a Tucker mid folded into down."""
        p = self.parts
        up, down = p["lora_up.weight"].float(), p["lora_down.weight"].float()
        if "lora_mid.weight" in p:   # down'[i, c, k, l] = sum_j mid[i, j, k, l] down[j, c]
            down = torch.einsum("ijkl,jc->ickl", p["lora_mid.weight"].float(), down.flatten(1))
        return up.flatten(1), down

    def _structure(self) -> torch.Tensor:
        """dW without alpha / rank (and without DoRA)."""
        p = {k: v.float() for k, v in self.parts.items()}
        if self.kind in ("lora", "locon"):
            up, down = self.factors()
            return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        if self.kind == "loha":
            if "hada_t1" in p:
                m1 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
                m2 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
            else:
                m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
            return m1 * m2
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = torch.einsum("ijkl,jr,ip->prkl", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """dW at strength 1, shaped like ``weight`` when given. DoRA needs ``weight`` (the base weight):
        dW = m * (W + d) / ||W + d|| - W, the norm per input channel ([1, in] magnitude, A1111 and ComfyUI)
        or per output channel ([out, 1] or 1-D magnitude)."""
        d = self._structure() * self.scale
        if weight is not None:
            d = d.reshape(weight.shape)
        if not self.dora:
            return d
        if weight is None:
            raise TrainerError(f"Module {self.name} is DoRA: its change rescales the base weight, so it needs the "
                               "base model; pass the model (--model MODEL).", field="model")
        w = weight.float()
        merged = w + d
        m = self.parts["dora_scale"].float()
        if m.dim() >= 2 and m.shape[0] == 1:   # magnitude per input channel
            norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, w.shape[1], *[1] * (w.dim() - 2))
        else:                                  # per output channel
            norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        return m.reshape(norm.shape) * merged / norm - w


@dataclass
class NetworkFile:
    """A LoRA or LyCORIS file read module by module (kohya module names; PEFT files are renamed)."""

    path: Path
    metadata: dict[str, str]
    format: str                                     # "kohya" | "peft"
    modules: dict[str, Net] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)   # keys no network type uses
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def types(self) -> dict[str, int]:
        """Network type label -> number of modules."""
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.label] = out.get(m.label, 0) + 1
        return out


def _group_parts(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Net], list[str]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        if part == "lora_A.weight":
            part = "lora_down.weight"
        elif part == "lora_B.weight":
            part = "lora_up.weight"
        if part in KNOWN_PARTS:
            parts.setdefault(name, {})[part] = t
        else:
            unknown.append(key)
    modules = {}
    for name, p in parts.items():
        alpha = p.pop("alpha", None)
        complete = ({"lora_down.weight", "lora_up.weight"} <= set(p) or
                    {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(p) or
                    (("lokr_w1" in p or {"lokr_w1_a", "lokr_w1_b"} <= set(p)) and
                     ("lokr_w2" in p or {"lokr_w2_a", "lokr_w2_b"} <= set(p))))
        if complete:
            modules[name] = Net(name, p, None if alpha is None else float(alpha.float().item()))
        else:
            unknown += [f"{name}.{k}" for k in p] + ([f"{name}.alpha"] if alpha is not None else [])
    return modules, sorted(unknown)


def read_network_file(path: str | Path) -> NetworkFile:
    """Read every module of a LoRA/LyCORIS file; TrainerError when it holds no network at all."""
    path = Path(path)
    tensors, metadata = _load(path)
    if any(k.split(".", 1)[0] in _PEFT_COMPONENTS for k in tensors):
        lora, unknown = _peft_to_modules(tensors, metadata)
        modules = {n: Net(n, {"lora_down.weight": m["down"], "lora_up.weight": m["up"],
                              **({"dora_scale": m["dora_scale"]} if "dora_scale" in m else {})}, m["alpha"])
                   for n, m in lora.items()}
        fmt = "peft"
    else:
        modules, unknown = _group_parts(tensors)
        fmt = "kohya"
    if not modules:
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise TrainerError(f"File '{path.name}' holds no LoRA/LyCORIS network (no lora_down/lora_up, hada_* or "
                           f"lokr_* tensors; a full model checkpoint or an embedding?); its keys look like: {sample}. "
                           "Pick a LoRA file.", field="lora")
    return NetworkFile(path, metadata, fmt, modules, sorted(unknown), tensors)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A weight or dW as the 2-D matrix ``[out, in * kh * kw]`` the SVD works on."""
    return t.reshape(t.shape[0], -1)
