"""Weighted blends of LoRA files: exact by rank concatenation, or compacted to rank R by a truncated SVD of each
module's summed dW (which also takes LoHa/LoKr, and DoRA given the base model), with the error per module."""
from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path

import torch

from ..errors import TrainerError
from .adapters import shapes_fit
from .deltas import Net, NetworkFile, flat, read_network_file
from .svd import (FitReport, ModuleFit, base_weights, check_target, choose_rank, kohya_tensors, module_usv,
                  svd_dense, svd_of_product, truncate, weights_dtype)

# what a derived file keeps of its source's metadata when it is no longer that training run (a blend)
BASE_MODEL_KEYS = ("ss_base_model_version", "ss_v2", "ss_v_parameterization", "ss_sd_model_name", "ss_resolution",
                   "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
                   "modelspec.prediction_type")


def derived_metadata(source: dict[str, str], out_path: Path, tensors: dict[str, torch.Tensor], alpha: float, *,
                     keep_all: bool = True) -> dict[str, str]:
    """Metadata for a file made from ``source``'s: all of it (``keep_all``) or its base-model keys, with the
    network keys (``networks.lora``, the most common rank, the one alpha) and title of the new file."""
    if keep_all:
        md = {k: v for k, v in source.items() if not k.startswith("sshs_")}
        if md.get("ss_network_module", "networks.lora") != "networks.lora":
            md.pop("ss_network_args", None)   # LyCORIS args (algo, ...) no longer describe the file
    else:
        md = {k: source[k] for k in BASE_MODEL_KEYS if k in source}
    ranks = Counter(int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    md.update({
        "ss_network_module": "networks.lora", "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(float(alpha)), "ss_output_name": out_path.stem,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.title": out_path.stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    })
    return md


def _read(items: list[tuple[str | Path, float]]) -> list[tuple[NetworkFile, float]]:
    if not items:
        raise TrainerError("Nothing to blend; give at least one LoRA file with a weight.", field="lora")
    files = [(read_network_file(p), float(w)) for p, w in items]
    for nf, _ in files:
        if nf.unknown:
            raise TrainerError(f"'{nf.path.name}' has tensors a blend cannot carry ({', '.join(nf.unknown[:3])}"
                               f"{' ...' if len(nf.unknown) > 3 else ''}); remove them or blend other files.",
                               field="lora")
    versions = {nf.metadata["ss_base_model_version"] for nf, _ in files if nf.metadata.get("ss_base_model_version")}
    if len(versions) > 1:
        raise TrainerError(f"These LoRAs were trained for different base models ({', '.join(sorted(versions))}); "
                           "blend files made for the same model.", field="lora")
    if not any(w != 0 for _, w in files):
        raise TrainerError("All blend weights are 0; give at least one file a non-zero weight.", field="lora")
    return files


def _refuse_for_concatenation(used: list[tuple[NetworkFile, float]]) -> None:
    for nf, _ in used:
        for name, net in nf.modules.items():
            if net.dora:
                raise TrainerError(f"'{nf.path.name}' holds DoRA modules (e.g. {name}); DoRA rescales the base "
                                   "weights, so its change cannot be concatenated with others exactly. Compact the "
                                   "blend instead: --rank R --model MODEL (each module's summed change against that "
                                   "base, re-factorised by SVD, error reported).", field="lora")
            if net.kind in ("loha", "lokr"):
                raise TrainerError(f"'{nf.path.name}' holds {net.label} modules (e.g. {name}); a {net.label} change "
                                   "is not a product of two low-rank factors, so it cannot be concatenated exactly. "
                                   "Compact the blend instead: --rank R (each module's summed change re-factorised "
                                   "by SVD, error reported).", field="lora")


def _by_module(used: list[tuple[NetworkFile, float]]) -> dict[str, list[tuple[NetworkFile, Net, float]]]:
    """name -> its contributions; shapes must agree between files."""
    out: dict[str, list[tuple[NetworkFile, Net, float]]] = {}
    for nf, w in used:
        for name, net in nf.modules.items():
            out.setdefault(name, []).append((nf, net, w))
    for name, parts in out.items():
        first_file, first, _ = parts[0]
        for nf, net, _ in parts[1:]:
            if not shapes_fit(net.shape, first.shape):
                raise TrainerError(f"Module {name} has different shapes in the blended files: {first_file.path.name} "
                                   f"{list(first.shape)} vs {nf.path.name} {list(net.shape)}; they were made for "
                                   "different models. Blend files made for the same model.", field="lora")
    return out


def _shape(parts: list[tuple[NetworkFile, Net, float]], weight: torch.Tensor | None) -> tuple[int, ...]:
    if weight is not None:
        return tuple(weight.shape)
    return max((net.shape for _, net, _ in parts), key=len)


def _concatenated(parts: list[tuple[NetworkFile, Net, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = sum_i w_i (alpha_i / r_i) up_i @ down_i."""
    ups, downs = [], []
    for _, net, w in parts:
        up, down = net.factors()
        ups.append(up * (w * net.scale))
        downs.append(flat(down))
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _plain(parts: list[tuple[NetworkFile, Net, float]]) -> bool:
    return all(net.kind in ("lora", "locon") and not net.dora for _, net, _ in parts)


def blend(items: list[tuple[str | Path, float]], out_path: str | Path, *, rank: int | None = None, model=None,
          metadata_extra: dict | None = None, dtype: torch.dtype | None = None) -> FitReport:
    """Blend weighted files (negative weights subtract) into one kohya LoRA with the effect of applying all.

    ``rank`` None: exact, by rank concatenation per module (LoRA/LoCon only; each up carries w_i alpha_i / r_i,
    so differing alphas stay exact). ``rank`` R: each module's summed dW (LoHa/LoKr included; DoRA against
    ``model``, a BaseModel or spec) is re-factorised to rank R by truncated SVD, the optimal rank-R
    approximation, and the report holds each module's relative error. ``dtype``: the inputs' if shared, else fp32.
    """
    files = _read(items)
    used = [(nf, w) for nf, w in files if w != 0]
    if rank is None:
        _refuse_for_concatenation(used)
    else:
        check_target(rank, None)
        if isinstance(model, (str, Path)) and any(m.dora for nf, _ in used for m in nf.modules.values()):
            from ..models.loader import load_base_model
            model = load_base_model(str(model))   # once for all files
    weights = {nf.path: base_weights(model, nf) for nf, _ in used} if rank is not None else {}
    packed, fits = {}, []
    for name, parts in _by_module(used).items():
        weight = next((weights[nf.path][name] for nf, _, _ in parts if name in weights.get(nf.path, {})), None)
        shape = _shape(parts, weight)
        if rank is None or _plain(parts):
            up, down = _concatenated(parts)
            total = int(down.shape[0])
            if rank is None:
                packed[name] = (up, down, float(total), shape)
                fits.append(ModuleFit(name, total, total, 0.0))
                continue
            usv = svd_of_product(up, down)
        elif len(parts) == 1:
            _, net, w = parts[0]
            u, s, vh, total = module_usv(net, weight, w)
            usv = (u, s, vh)
        else:
            delta = sum(flat(net.delta(weights[nf.path].get(name))) * w for nf, net, w in parts)
            usv, total = svd_dense(delta), min(delta.shape)
        up, down, fit = truncate(name, usv, choose_rank(usv[1], rank), total)
        packed[name] = (up, down, float(fit.rank), shape)
        fits.append(fit)
    tensors, alpha = kohya_tensors(packed)
    out_path = Path(out_path)
    report = FitReport(out_path, fits, exact=rank is None)
    metadata = derived_metadata(used[0][0].metadata, out_path, tensors, alpha, keep_all=False)
    metadata.update({
        "modelspec.merged_from": ", ".join(f"{nf.path.parent.name}/{nf.path.name}" for nf, _ in files),
        "lora_trainer.blend": json.dumps([{"file": nf.path.name, "weight": w,
                                           "sshs_model_hash": nf.metadata.get("sshs_model_hash", "")}
                                          for nf, w in files]),
    })
    if rank is not None:
        metadata["lora_trainer.compact"] = json.dumps({"rank": rank, "overall_error": report.overall_error,
                                                       "max_error": report.max_error})
    metadata.update({k: str(v) for k, v in (metadata_extra or {}).items()})
    from .export import save_adapter
    save_adapter(out_path, tensors, metadata, dtype=dtype or weights_dtype([nf for nf, _ in used]))
    return report


def blend_files(items: list[tuple[str | Path, float]], out_path: str | Path, metadata_extra: dict | None = None,
                *, dtype: torch.dtype | None = None) -> Path:
    """The exact blend's path (``blend`` without a rank); kept for callers that only need the file."""
    return blend(items, out_path, metadata_extra=metadata_extra, dtype=dtype).path
