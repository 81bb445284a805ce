"""Truncated SVD of weight changes: the optimal rank-k factors per module (fixed rank or energy threshold) with
their relative errors, kohya tensors with one alpha, and ``resize_file`` (compact blends live in ``blend``)."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TrainerError
from .deltas import Net, NetworkFile, flat, read_network_file


@dataclass
class ModuleFit:
    """One module's re-factorisation: ranks before/after and ||dW - dW_k||_F / ||dW||_F."""

    name: str
    rank_in: int         # rank of what was factorised (a blend: its summed ranks; LoHa/LoKr/DoRA: the full dW's)
    rank: int            # rank written
    rel_error: float
    sq_norm: float = 0.0     # ||dW||_F^2, for the overall error
    sq_lost: float = 0.0     # squared singular values left out


@dataclass
class FitReport:
    """What ``resize_file`` and ``blend`` wrote: the file and each module's fit (exact verbs: errors 0)."""

    path: Path
    modules: list[ModuleFit] = field(default_factory=list)
    exact: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def overall_error(self) -> float:
        """sqrt(sum of the squared singular values left out / sum of all), over every module."""
        total = sum(m.sq_norm for m in self.modules)
        return math.sqrt(sum(m.sq_lost for m in self.modules) / total) if total > 0 else 0.0

    @property
    def max_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def worst(self, n: int = 5) -> list[ModuleFit]:
        return sorted(self.modules, key=lambda m: -m.rel_error)[:n]

    def summary(self) -> str:
        ranks = Counter(m.rank for m in self.modules)
        lines = [f"wrote {self.path}", f"{len(self.modules)} modules, ranks " +
                 ", ".join(f"{r} x{n}" for r, n in sorted(ranks.items()))]
        if self.exact:
            lines.append("exact (rank concatenation): relative error 0")
        else:
            lines.append(f"relative error overall {self.overall_error:.3e}, worst module {self.max_error:.3e}")
            lines += [f"  {m.name}: rank {m.rank_in} -> {m.rank}, error {m.rel_error:.3e}" for m in self.worst()]
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "exact": self.exact, "overall_error": self.overall_error,
                "max_error": self.max_error, "notes": self.notes,
                "modules": [{"name": m.name, "rank_in": m.rank_in, "rank": m.rank, "rel_error": m.rel_error}
                            for m in self.modules]}


# --- the maths ------------------------------------------------------------------------------
def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD (U, S, Vh) of ``up @ down`` (``[out, r] @ [r, in]``) from QR of the factors: the
    SVD of an r x r core, so a rank-r product never becomes a dense out x in matrix."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def svd_dense(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense dW (flattened to 2-D)."""
    return torch.linalg.svd(flat(delta).double(), full_matrices=False)


def choose_rank(s: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """k for a fixed ``rank`` (at most the singular values there are) or the smallest k whose singular values
    keep ``energy`` of sum(s^2), the squared Frobenius norm (0.95 keeps 95 %: error at most sqrt(0.05))."""
    if rank is not None:
        return max(1, min(int(rank), len(s)))
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return max(1, min(int((kept < energy - 1e-12).sum()) + 1, len(s)))


def truncate(name: str, usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int, rank_in: int
             ) -> tuple[torch.Tensor, torch.Tensor, ModuleFit]:
    """(up ``[out, k]``, down ``[k, in]``, fit) of the rank-k truncation; the singular values are split
    evenly (sqrt) between the factors, as kohya's resize does."""
    u, s, vh = usv
    root = s[:k].sqrt()
    sq = s.double() ** 2
    total, lost = float(sq.sum()), float(sq[k:].sum())
    fit = ModuleFit(name, rank_in, k, math.sqrt(lost / total) if total > 0 else 0.0, total, lost)
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float(), fit


def kohya_tensors(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float, tuple[int, ...]]]
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """kohya tensors from {name: (up, down, preferred alpha, weight shape)} with dW = up @ down, and the alpha.

    One alpha for every module (the most common preferred one; diffusers applies one alpha per adapter
    best); a module whose preferred alpha differs gets its up multiplied so dW stays exact in every loader.
    """
    alpha = Counter(a for _, _, a, _ in modules.values()).most_common(1)[0][0]
    out: dict[str, torch.Tensor] = {}
    for name, (up, down, _, shape) in modules.items():
        k = down.shape[0]
        up = up.reshape(up.shape[0], k) * (k / alpha)
        if len(shape) == 4:
            down, up = down.reshape(k, *shape[1:]), up[:, :, None, None]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out, float(alpha)


def weights_dtype(files: list[NetworkFile]) -> torch.dtype:
    """The inputs' weight dtype when they share one, else fp32."""
    kinds = {t.dtype for f in files for m in f.modules.values() for t in m.parts.values()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def base_weights(model, nf: NetworkFile) -> dict[str, torch.Tensor]:
    """kohya name -> base weight for the DoRA modules of ``nf`` (``model``: a BaseModel or a model spec)."""
    from ..models.loader import BaseModel, load_base_model
    from .adapters import base_layer, place
    dora = {n: m.shape for n, m in nf.modules.items() if m.dora}
    if not dora:
        return {}
    if model is None:
        raise TrainerError(f"'{nf.path.name}' has {len(dora)} DoRA modules (e.g. {next(iter(dora))}); a DoRA "
                           "change rescales the base weights, so it needs the base model: pass --model MODEL.",
                           field="model")
    base = model if isinstance(model, BaseModel) else load_base_model(str(model))
    components = base.components()
    placement = place(components, base.arch, dora)
    problem = placement.refusal(nf.path.name, base.arch)
    if problem:
        raise TrainerError(problem, field="model")
    return {n: base_layer(components, t).weight.detach().float() for n, t in placement.targets.items()}


def module_usv(net: Net, weight: torch.Tensor | None, factor: float = 1.0):
    """(U, S, Vh, rank_in) of ``factor`` x the module's dW: from its factors for LoRA/LoCon, dense otherwise."""
    if net.kind in ("lora", "locon") and not net.dora:
        up, down = net.factors()
        return (*svd_of_product(up * (net.scale * factor), flat(down)), net.rank)
    delta = flat(net.delta(weight)) * factor
    return (*svd_dense(delta), min(delta.shape))


# --- resize ---------------------------------------------------------------------------------
def check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise TrainerError("Give either a rank (--rank R) or an energy threshold (--energy 0.95), not both and "
                           "not neither.", field="rank")
    if rank is not None and rank < 1:
        raise TrainerError(f"Rank {rank} is not usable; give 1 or more.", field="rank")
    if energy is not None and not 0 < energy <= 1:
        raise TrainerError(f"Energy {energy} is not a share; give a number above 0 and at most 1, e.g. 0.95.",
                           field="energy")


def resize_file(path: str | Path, out_path: str | Path, *, rank: int | None = None, energy: float | None = None,
                model=None, dtype: torch.dtype | None = None) -> FitReport:
    """Re-factorise every module of a LoRA/LyCORIS file by truncated SVD to ``rank`` or to the smallest rank
    keeping ``energy`` of each module's squared Frobenius norm; writes a LoRA (LoCon for 3x3 convs).

    alpha is set so each module keeps its scale (alpha = old alpha / old rank x new rank, as kohya's
    resize_lora); one alpha is written, and a module whose scale differs has it folded into its up.
    ``model`` (BaseModel or spec) is needed only for DoRA modules. Returns each module's relative error.
    """
    from .blend import derived_metadata
    check_target(rank, energy)
    nf = read_network_file(path)
    if nf.unknown:
        raise TrainerError(f"'{nf.path.name}' has tensors resize cannot carry over ({', '.join(nf.unknown[:3])}"
                           f"{' ...' if len(nf.unknown) > 3 else ''}); remove them first.", field="lora")
    weights = base_weights(model, nf)
    packed, fits = {}, []
    for name, net in nf.modules.items():
        u, s, vh, rank_in = module_usv(net, weights.get(name))
        up, down, fit = truncate(name, (u, s, vh), choose_rank(s, rank, energy), rank_in)
        keep = abs(net.scale) if net.kind in ("lora", "locon") and not net.dora else 1.0
        shape = tuple(weights[name].shape) if name in weights else net.shape
        packed[name] = (up, down, keep * fit.rank, shape)
        fits.append(fit)
    tensors, alpha = kohya_tensors(packed)
    report = FitReport(Path(out_path), fits)
    metadata = derived_metadata(nf.metadata, Path(out_path), tensors, alpha)
    metadata["lora_trainer.resize"] = json.dumps({"source": nf.path.name, "rank": rank, "energy": energy,
                                                  "overall_error": report.overall_error,
                                                  "max_error": report.max_error})
    from .export import save_adapter
    save_adapter(out_path, tensors, metadata, dtype=dtype or weights_dtype([nf]))
    return report
