"""Converting LoRA files between the kohya layout (our export, A1111, ComfyUI) and the diffusers/PEFT layout
(``unet.<path>.lora_A.weight`` with ``lora_adapter_metadata``), exactly: the same factors and per-module alphas."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..errors import TrainerError
from ..fileio import atomic_write_bytes
from ..network.kohya import module_name_map
from .deltas import NetworkFile, read_network_file
from .export import FORMAT_KEY, save_adapter
from .inspect import guess_architecture

TARGETS = ("kohya", "peft")


@dataclass
class ConvertResult:
    """What ``convert_file`` wrote."""

    path: Path
    to: str                 # "kohya" | "peft"
    arch: str
    modules: int

    def summary(self) -> str:
        return f"wrote {self.path} ({self.to} layout, {self.modules} modules, {self.arch})"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "to": self.to, "arch": self.arch, "modules": self.modules}


def _meta_components(folder: Path, arch: str) -> dict[str, nn.Module]:
    """The model's modules, without weights (meta device), from a diffusers config folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        comps = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if arch == "sdxl":
            comps["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return comps


def _candidates(nf: NetworkFile, model) -> list[tuple[str, dict[str, nn.Module]]]:
    """(arch, components) layouts to map kohya names through, best first: ``model`` (a BaseModel, a diffusers
    or config folder, or a model spec), else the shipped configs of the architecture the keys imply (SD1/SD2:
    the SD1 configs, then the built-in model's)."""
    from ..models.builtin import BUILTIN_DIR
    from ..models.loader import CONFIGS_DIR, BaseModel, load_base_model
    arch, _ = guess_architecture(nf)
    if isinstance(model, BaseModel):
        return [(model.arch, model.components())]
    if model is not None:
        folder = Path(model)
        if (folder / "unet" / "config.json").is_file():
            arch = "sdxl" if (folder / "text_encoder_2").is_dir() else ("sd2" if arch == "sd2" else "sd1")
            return [(arch, _meta_components(folder, arch))]
        base = load_base_model(str(model))
        return [(base.arch, base.components())]
    if arch == "unknown":
        claimed = nf.metadata.get("ss_base_model_version", "")
        arch = "sdxl" if "sdxl" in claimed else "sd1" if claimed else "unknown"
    if arch == "unknown":
        raise TrainerError(f"Cannot tell which model '{nf.path.name}' was made for from its keys or metadata; "
                           "pass the base model (--model MODEL or its config folder).", field="model")
    if arch == "sdxl":
        return [("sdxl", _meta_components(CONFIGS_DIR / "sdxl", "sdxl"))]
    arch = "sd2" if arch == "sd2" else "sd1"   # SD1 and SD2 share module names
    return [(arch, _meta_components(folder, arch)) for folder in (CONFIGS_DIR / "sd1", BUILTIN_DIR)]


def layout(nf: NetworkFile, model=None) -> tuple[str, dict[str, tuple[str, str]]]:
    """(arch, kohya name -> (component, module path)) covering every module of ``nf``; TrainerError naming
    the modules no candidate layout has."""
    best: tuple[list[str], str] | None = None
    for arch, components in _candidates(nf, model):
        lookup = module_name_map(components, arch, aliases=True)
        missing = [n for n in nf.modules if n not in lookup]
        if not missing:
            return arch, lookup
        best = best if best and len(best[0]) <= len(missing) else (missing, arch)
    missing, arch = best
    raise TrainerError(f"'{nf.path.name}' has {len(missing)} modules the {arch} layout does not have "
                       f"({', '.join(missing[:3])}); pass the base model it was made for (--model MODEL).",
                       field="model")


def _peft_metadata(entries: dict[str, dict[str, tuple[int, float]]]) -> str:
    """diffusers' ``lora_adapter_metadata``: per component the LoraConfig kwargs (r, lora_alpha, patterns)."""
    meta = {}
    for component, paths in entries.items():
        r = Counter(v[0] for v in paths.values()).most_common(1)[0][0]
        alpha = Counter(v[1] for v in paths.values()).most_common(1)[0][0]
        meta.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted(paths),
                     f"{component}.rank_pattern": {p: v[0] for p, v in paths.items() if v[0] != r},
                     f"{component}.alpha_pattern": {p: v[1] for p, v in paths.items() if v[1] != alpha}})
    return json.dumps(meta, indent=2, sort_keys=True)


def _to_peft(nf: NetworkFile, out_path: Path, model) -> ConvertResult:
    arch, lookup = layout(nf, model)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, tuple[int, float]]] = {}
    for name, net in nf.modules.items():
        component, path = lookup[name]
        down = net.parts["lora_down.weight"]
        if "lora_mid.weight" in net.parts:   # a Tucker mid folds into down exactly
            down = net.factors()[1].to(down.dtype)
        tensors[f"{component}.{path}.lora_A.weight"] = down.contiguous()
        tensors[f"{component}.{path}.lora_B.weight"] = net.parts["lora_up.weight"].contiguous()
        entries.setdefault(component, {})[path] = (net.rank, float(net.alpha if net.alpha is not None else net.rank))
    metadata = {k: v for k, v in nf.metadata.items() if not k.startswith("sshs_")}
    metadata.update({"format": "pt", "lora_adapter_metadata": _peft_metadata(entries), FORMAT_KEY: "peft"})
    atomic_write_bytes(out_path, st_save(tensors, metadata))
    return ConvertResult(out_path, "peft", arch, len(nf.modules))


def _to_kohya(nf: NetworkFile, out_path: Path) -> ConvertResult:
    tensors: dict[str, torch.Tensor] = {}
    for name, net in nf.modules.items():
        tensors[f"{name}.lora_down.weight"] = net.parts["lora_down.weight"]
        tensors[f"{name}.lora_up.weight"] = net.parts["lora_up.weight"]
        tensors[f"{name}.alpha"] = torch.tensor(float(net.alpha if net.alpha is not None else net.rank))
    metadata = {k: v for k, v in nf.metadata.items()
                if k not in ("format", "lora_adapter_metadata", FORMAT_KEY) and not k.startswith("sshs_")}
    dtypes = {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")}
    save_adapter(out_path, tensors, metadata, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
    arch = guess_architecture(nf)[0]
    return ConvertResult(out_path, "kohya", arch, len(nf.modules))


def convert_file(path: str | Path, out_path: str | Path, *, to: str, model=None) -> ConvertResult:
    """Write ``path`` in the ``to`` layout ("kohya" or "peft"), tensor for tensor.

    kohya -> peft maps module names through the model's layout (``model``, else the shipped configs of the
    architecture the keys imply); peft -> kohya names modules as our export does (SDXL UNet in SGM names).
    LoHa/LoKr/DoRA files and unknown tensors are refused (the PEFT layout diffusers loads has no place for them).
    """
    if to not in TARGETS:
        raise TrainerError(f"Convert target {to!r} is not one of {', '.join(TARGETS)}.", field="to")
    nf = read_network_file(path)
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise TrainerError(f"Output path '{out_path}' must end in .safetensors; rename it.", field="output")
    if nf.unknown:
        raise TrainerError(f"'{nf.path.name}' has tensors no LoRA layout has a place for "
                           f"({', '.join(nf.unknown[:3])}); remove them first.", field="lora")
    other = [(n, m.label) for n, m in nf.modules.items() if m.dora or m.kind in ("loha", "lokr")]
    if other:
        raise TrainerError(f"'{nf.path.name}' holds {other[0][1]} modules (e.g. {other[0][0]}); convert handles "
                           "LoRA/LoCon only. Resize it to a LoRA first (resize --rank R).", field="lora")
    if nf.format == to:
        raise TrainerError(f"'{nf.path.name}' is already in the {to} layout.", field="to")
    if to == "peft":
        return _to_peft(nf, out_path, model)
    return _to_kohya(nf, out_path)
