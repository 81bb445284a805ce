"""What a LoRA/LyCORIS file holds: key format, the architecture its keys imply, network types, modules per group with
rank and alpha, metadata (ss_*, modelspec.*, ours) and warnings about what tools will do with it (``inspect_file``)."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .deltas import NetworkFile, read_network_file
from .export import is_projector_module

FORMATS = {"kohya-diffusers": "kohya, diffusers-style UNet names (lora_unet_down_blocks_...)",
           "kohya-sgm": "kohya, LDM/SGM-style UNet names (lora_unet_input_blocks_...)",
           "kohya": "kohya names, no UNet modules", "peft": "PEFT/diffusers (unet.<path>.lora_A.weight)",
           "lycoris": "LyCORIS parts under kohya names (LoHa, LoKr, DoRA, LoCon mid)"}
_VERSION_ARCH = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2", "sdxl_base_v1-0": "sdxl"}
_WIDTH_ARCH = {768: {"sd1"}, 1024: {"sd2"}, 2048: {"sdxl"}}   # cross-attention context width
_SGM = re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_")
_DIFFUSERS = re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_")


@dataclass
class GroupInfo:
    """Modules of one group (unet, text_encoder, text_encoder_2, projectors) by type, rank and alpha."""

    modules: int = 0
    types: Counter = field(default_factory=Counter)
    ranks: Counter = field(default_factory=Counter)
    alphas: Counter = field(default_factory=Counter)    # "none" for modules without an alpha


@dataclass
class FileReport:
    """``inspect_file``'s answer; ``summary()`` is the text the CLI prints, ``to_dict()`` its --json."""

    path: Path
    format: str
    architecture: str                     # "sd1", "sd2", "sdxl", "sd1/sd2" or "unknown" (from the keys)
    evidence: list[str]
    network_types: dict[str, int]
    groups: dict[str, GroupInfo]
    modules: list[dict]                   # name, group, type, rank, alpha, shape
    metadata: dict[str, dict[str, str]]   # "ss", "modelspec", "ours", "other"
    warnings: list[str]
    unknown: list[str]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "format_description": FORMATS[self.format],
                "architecture": self.architecture, "evidence": self.evidence, "network_types": self.network_types,
                "groups": {g: {"modules": i.modules, "types": dict(i.types), "ranks": dict(i.ranks),
                               "alphas": dict(i.alphas)} for g, i in self.groups.items()},
                "modules": self.modules, "metadata": self.metadata, "warnings": self.warnings,
                "unknown_tensors": self.unknown}

    def summary(self) -> str:
        def counts(c: Counter) -> str:
            return ", ".join(f"{k} x{n}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0]))))
        lines = [f"{self.path.name}", f"format: {self.format} ({FORMATS[self.format]})",
                 f"architecture: {self.architecture}" + (f" ({'; '.join(self.evidence)})" if self.evidence else ""),
                 "network: " + counts(Counter(self.network_types))]
        for name, g in self.groups.items():
            lines.append(f"{name}: {g.modules} modules; rank {counts(g.ranks)}; alpha {counts(g.alphas)}")
        for kind, md in self.metadata.items():
            if md:
                lines.append(f"metadata ({kind}):")
                lines += [f"  {k} = {v if len(v) <= 100 else v[:97] + '...'}" for k, v in sorted(md.items())]
        lines += [f"warning: {w}" for w in self.warnings] or ["no warnings"]
        return "\n".join(lines)


def _group(name: str) -> str:
    if is_projector_module(name):
        return "projectors"
    for prefix, group in (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                          ("lora_te_", "text_encoder")):
        if name.startswith(prefix):
            return group
    return "other"


def _format(nf: NetworkFile) -> str:
    if nf.format == "peft":
        return "peft"
    if any(m.kind in ("loha", "lokr") or m.dora or "lora_mid.weight" in m.parts for m in nf.modules.values()):
        return "lycoris"
    names = list(nf.modules)
    if any(_SGM.match(n) for n in names):
        return "kohya-sgm"
    return "kohya-diffusers" if any(_DIFFUSERS.match(n) for n in names) else "kohya"


def guess_architecture(nf: NetworkFile) -> tuple[str, list[str]]:
    """(architecture, evidence) from key names and widths alone; metadata is not consulted."""
    votes: list[tuple[set[str], str]] = []
    names = list(nf.modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        votes.append(({"sdxl"}, "two text encoders (lora_te1_/lora_te2_)"))
    elif any(n.startswith("lora_te_") for n in names):
        votes.append(({"sd1", "sd2"}, "one text encoder (lora_te_)"))
    widths = {m.shape[1] for n, m in nf.modules.items() if re.search(r"attn2_to_[kv]$", n) and len(m.shape) == 2}
    for width in sorted(widths & set(_WIDTH_ARCH)):
        votes.append((_WIDTH_ARCH[width], f"cross-attention input width {width}"))
    if any(re.search(r"transformer_blocks_[1-9]", n) for n in names if n.startswith("lora_unet_")):
        votes.append(({"sdxl"}, "several transformer blocks per attention (SDXL)"))
    if any(n.startswith(("lora_unet_input_blocks_1_1_", "lora_unet_input_blocks_2_1_",
                         "lora_unet_down_blocks_0_attentions_")) for n in names):
        votes.append(({"sd1", "sd2"}, "attention at the first UNet level (SD1/SD2)"))
    if not votes:
        return "unknown", []
    common = set.intersection(*(v for v, _ in votes))
    if not common:
        return "unknown", [f"contradictory: {why}" for _, why in votes]
    return "/".join(sorted(common)), [why for _, why in votes]


def _claimed(metadata: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key, value, arch) for each metadata key that names an architecture."""
    out = []
    version = metadata.get("ss_base_model_version", "")
    if version:
        out.append(("ss_base_model_version", version,
                    _VERSION_ARCH.get(version, "sdxl" if "sdxl" in version else "sd2" if "v2" in version else "sd1")))
    spec = metadata.get("modelspec.architecture", "")
    if spec.startswith("stable-diffusion"):
        out.append(("modelspec.architecture", spec, "sdxl" if "-xl-" in spec else "sd2" if "-v2" in spec else "sd1"))
    if metadata.get("ss_v2") == "True":
        out.append(("ss_v2", "True", "sd2"))
    return out


def _metadata_warnings(nf: NetworkFile, arch: str, evidence: list[str], groups: dict[str, GroupInfo]) -> list[str]:
    md, out = nf.metadata, []
    possible = set(arch.split("/")) if arch != "unknown" else set()
    for key, value, claimed in _claimed(md):
        if possible and claimed not in possible:
            out.append(f"metadata {key} = '{value}' says {claimed}, but the keys are {arch}'s ({'; '.join(evidence)})"
                       f": A1111 hides a LoRA whose version does not match the loaded model, so it will not list this "
                       f"file next to an {arch} model. Fix {key}.")
    ranks = {r for g in groups.values() for r in g.ranks}
    alphas = {a for g in groups.values() for a in g.alphas if a != "none"}
    dim, alpha = md.get("ss_network_dim"), md.get("ss_network_alpha")
    if dim and dim.isdigit() and ranks and int(dim) not in ranks:
        out.append(f"metadata ss_network_dim = {dim}, but the modules have rank {', '.join(map(str, sorted(ranks)))}.")
    try:
        if alpha and alphas and float(alpha) not in alphas:
            out.append(f"metadata ss_network_alpha = {alpha}, but the modules' alpha is "
                       f"{', '.join(f'{a:g}' for a in sorted(alphas))}.")
    except ValueError:
        out.append(f"metadata ss_network_alpha = {alpha!r} is not a number.")
    lycoris = any(t not in ("LoRA", "LoCon") for t in nf.types())
    if md.get("ss_network_module") == "networks.lora" and lycoris:
        out.append(f"metadata ss_network_module = networks.lora, but the file holds {', '.join(nf.types())} "
                   "modules (LyCORIS writes lycoris.kohya).")
    return out


def _tensor_warnings(nf: NetworkFile) -> list[str]:
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    out = []
    no_alpha = [n for n, m in nf.modules.items() if m.alpha is None]
    if no_alpha:
        out.append(f"{len(no_alpha)} modules have no alpha ({some(no_alpha)}); loaders then use alpha = rank "
                   "(scale 1).")
    zero = [n for n, m in nf.modules.items() if "lora_up.weight" in m.parts and not m.parts["lora_up.weight"].any()]
    if zero:
        out.append(f"{len(zero)} modules have an all-zero lora_up ({some(zero)}), so they change nothing "
                   "(untrained, or saved before the first step).")
    bad = [k for k, t in nf.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        out.append(f"{len(bad)} tensors hold NaN or inf ({some(bad)}); the file would break any image it touches.")
    unet_alphas = sorted({m.alpha for n, m in nf.modules.items() if _group(n) == "unet" and m.alpha is not None})
    if len(unet_alphas) > 1:
        out.append(f"the UNet modules have different alphas ({', '.join(f'{a:g}' for a in unet_alphas)}): "
                   "A1111, ComfyUI and sd-scripts apply each, diffusers' load_lora_weights scales some wrongly.")
    types = nf.types()
    if any(t not in ("LoRA", "LoCon") for t in types):
        out.append(f"{', '.join(t for t in types if t not in ('LoRA', 'LoCon'))} modules: A1111 and ComfyUI load "
                   "them, diffusers does not.")
    if _format(nf) == "kohya-sgm" and guess_architecture(nf)[0] in ("sd1", "sd2", "sd1/sd2"):
        out.append("SD1/SD2 UNet modules in LDM names: A1111 and ComfyUI load them, sd-scripts drops them and "
                   "diffusers raises; convert to the diffusers-style names for those.")
    if nf.unknown:
        out.append(f"{len(nf.unknown)} tensors belong to no network type ({some(nf.unknown)}); loaders skip or "
                   "reject them.")
    return out


def inspect_file(path: str | Path) -> FileReport:
    """Read a LoRA/LyCORIS file and describe it (TrainerError when it is not a network file)."""
    nf = read_network_file(path)
    arch, evidence = guess_architecture(nf)
    groups: dict[str, GroupInfo] = {}
    modules = []
    for name, m in nf.modules.items():
        group = _group(name)
        g = groups.setdefault(group, GroupInfo())
        g.modules += 1
        g.types[m.label] += 1
        g.ranks[m.rank] += 1
        g.alphas["none" if m.alpha is None else m.alpha] += 1
        modules.append({"name": name, "group": group, "type": m.label, "rank": m.rank, "alpha": m.alpha,
                        "shape": list(m.shape)})
    md = nf.metadata
    metadata = {"ss": {k: v for k, v in md.items() if k.startswith(("ss_", "sshs_"))},
                "modelspec": {k: v for k, v in md.items() if k.startswith("modelspec.")},
                "ours": {k: v for k, v in md.items() if k.startswith("lora_trainer.")}}
    metadata["other"] = {k: v for k, v in md.items() if not any(k in d for d in metadata.values())}
    warnings = _metadata_warnings(nf, arch, evidence, groups) + _tensor_warnings(nf)
    return FileReport(nf.path, _format(nf), arch, evidence, nf.types(), groups, modules, metadata, warnings,
                      nf.unknown)
