"""Baking adapters into a base model: W += weight x dW for every module of each file (any network type), written
as a diffusers folder or a single-file checkpoint in the original LDM layout (A1111, ComfyUI, ``from_single_file``)."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TrainerError
from ..models.checkpoint import CHECKPOINT_SUFFIXES, to_ldm_state_dict, write_checkpoint
from .adapters import base_layer, place
from .deltas import NetworkFile, read_network_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BakeResult:
    """What ``bake`` wrote and what went into it."""

    path: Path
    kind: str                                   # "single file" | "diffusers folder"
    arch: str
    merged: list[dict] = field(default_factory=list)   # per file: name, weight, modules, types

    def summary(self) -> str:
        files = ", ".join(f"{m['file']} x{m['weight']:g} ({m['modules']} modules)" for m in self.merged)
        return f"wrote {self.path} ({self.kind}, {self.arch}) with {files}"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "arch": self.arch, "merged": self.merged}


def _placed(components, arch: str, nf: NetworkFile):
    """kohya name -> (component, path) for every module of ``nf``, or a TrainerError naming what does not fit."""
    from .inspect import guess_architecture
    placement = place(components, arch, {n: m.shape for n, m in nf.modules.items()})
    problem = placement.refusal(nf.path.name, arch, nf.unknown, file_arch=guess_architecture(nf)[0])
    if problem:
        raise TrainerError(problem, field="lora")
    return placement.targets


def merge_into(base, loras: list[tuple[str | Path, float]]) -> list[dict]:
    """Add weight x dW of each file to ``base``'s weights in place (DoRA against the unmerged weights, as
    A1111 computes every file's change from the original). Everything is checked before anything changes."""
    components = base.components()
    files = [(read_network_file(p), float(w)) for p, w in loras]
    placed = [_placed(components, base.arch, nf) for nf, _ in files]
    dora_targets = {t for (nf, _), targets in zip(files, placed) for n, t in targets.items() if nf.modules[n].dora}
    originals = {t: base_layer(components, t).weight.detach().float().clone() for t in dora_targets}
    merged = []
    with torch.no_grad():
        for (nf, w), targets in zip(files, placed):
            for name, target in targets.items():
                weight = base_layer(components, target).weight
                delta = nf.modules[name].delta(originals.get(target, weight.detach().float()))
                weight.add_((w * delta).to(weight.dtype))
            merged.append({"file": nf.path.name, "weight": w, "modules": len(targets), "types": nf.types()})
    return merged


def _write_folder(base, out: Path, dtype: torch.dtype) -> Path:
    from ..models.loader import make_pipeline
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainerError(f"Output '{out}' already exists; pick a new folder name (or a .safetensors file).",
                           field="output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        base.to("cpu", dtype)
        make_pipeline(base).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def bake(model, loras: list[tuple[str | Path, float]], out_path: str | Path, *, dtype: str = "fp32",
         config_dir: str | None = None) -> BakeResult:
    """Merge ``loras`` ([(file, weight)], any network type) into ``model`` and write it to ``out_path``.

    ``model``: a model spec (``load_base_model``) or a BaseModel, whose weights are then changed in place.
    ``out_path`` ending in .safetensors/.ckpt: one checkpoint in the original LDM layout; otherwise a new
    diffusers folder. ``dtype`` of the written weights: fp32 (default: generation equals the unmerged
    adapter's), fp16 or bf16. A file made for another model is refused with the module and shapes that differ.
    """
    from ..models.loader import BaseModel, load_base_model
    if dtype not in DTYPES:
        raise TrainerError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.", field="dtype")
    if not loras:
        raise TrainerError("Nothing to bake; give at least one LoRA file with a weight (--lora FILE:W).",
                           field="lora")
    out = Path(out_path)
    base = model if isinstance(model, BaseModel) else load_base_model(str(model), config_dir=config_dir)
    merged = merge_into(base, loras)
    if out.suffix.lower() in CHECKPOINT_SUFFIXES:
        state = to_ldm_state_dict(base.arch, base.unet, base.vae, base.text_encoders, base.prediction_type)
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
        write_checkpoint(state, out)
        kind = "single file"
    else:
        _write_folder(base, out, DTYPES[dtype])
        kind = "diffusers folder"
    return BakeResult(out, kind, base.arch, merged)
