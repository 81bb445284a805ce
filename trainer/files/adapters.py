"""Reading LoRA files (ours, kohya/A1111, PEFT/diffusers) and applying them to a loaded model as PEFT
adapters: live strengths (``set_weights``), several at once, removal, and weighted blends of files."""
from __future__ import annotations

import datetime
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import TrainerError
from .export import save_adapter
from ..network.kohya import kohya_name, module_name_map
from ..network.lora import delete_adapter, inject_peft, lora_config_for, lora_modules, set_active

_PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_LYCORIS = ("hada_", "lokr_", "lora_mid", "dora_scale", "diff", "oft_", "w_norm", "b_norm")   # kohya-named parts


@dataclass
class LoraFile:
    """A LoRA read from disk; ``modules`` maps kohya module name -> {"down", "up", "alpha"}."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, dict] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)   # keys we cannot apply (LyCORIS, DoRA, ...)
    format: str = "kohya"                                   # "kohya" | "peft"


# --- reading ------------------------------------------------------------------------------
def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise TrainerError(f"LoRA file '{path}' does not exist; check the path.", field="lora")
    if path.suffix.lower() != ".safetensors":
        raise TrainerError(f"LoRA file '{path.name}' is not a .safetensors file; only safetensors LoRAs are "
                           "supported (convert .ckpt/.pt files first).", field="lora")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise TrainerError(f"LoRA file '{path.name}' cannot be read as safetensors ({err}); it is damaged or "
                           "incomplete. Download or export it again.", field="lora") from None


def _parse_kohya(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], list[str]]:
    parts: dict[str, dict] = {}
    unsupported = []
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        if part in ("lora_down.weight", "lora_A.weight"):
            parts.setdefault(name, {})["down"] = t
        elif part in ("lora_up.weight", "lora_B.weight"):
            parts.setdefault(name, {})["up"] = t
        elif part == "alpha":
            parts.setdefault(name, {})["alpha"] = float(t.float().item())
        else:
            unsupported.append(key)
    modules = {}
    for name, p in parts.items():
        if "down" in p and "up" in p:
            modules[name] = {"down": p["down"], "up": p["up"], "alpha": p.get("alpha", float(p["down"].shape[0]))}
        else:
            unsupported += [f"{name}.{k}" for k in p]
    return modules, unsupported


def _peft_to_modules(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, list[str]]:
    """PEFT/diffusers keys (``unet.<path>.lora_A.weight``, older ``to_q_lora.down``) -> kohya modules."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils.other import get_pattern_key
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = t
    sdxl = "text_encoder_2" in by_component or "sdxl" in metadata.get("ss_base_model_version", "")
    arch = "sdxl" if sdxl else "sd1"
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        meta = {}   # unreadable diffusers metadata: fall back to alpha = rank below
    modules: dict[str, dict] = {}
    unsupported: list[str] = []
    for component, sd in by_component.items():
        if component not in _PEFT_COMPONENTS:
            unsupported += [f"{component}.{k}" for k in sd]
            continue
        if component == "unet":
            sd = convert_unet_state_dict_to_peft(sd)
        elif any("lora_linear_layer" in k or "to_out_lora" in k for k in sd):
            sd = convert_state_dict_to_peft(sd)
        alpha_default = meta.get(f"{component}.lora_alpha")
        alpha_pattern = meta.get(f"{component}.alpha_pattern") or {}
        for key, down in sd.items():
            if not key.endswith(".lora_A.weight"):
                if not key.endswith((".lora_B.weight", ".alpha")):
                    unsupported.append(f"{component}.{key}")
                continue
            path = key[: -len(".lora_A.weight")]
            up = sd.get(f"{path}.lora_B.weight")
            if up is None:
                unsupported.append(f"{component}.{key}")
                continue
            rank = down.shape[0]
            if f"{path}.alpha" in sd:
                alpha = float(sd[f"{path}.alpha"].item())
            elif alpha_default is not None:
                pat = get_pattern_key(list(alpha_pattern), path)
                alpha = float(alpha_pattern.get(pat, alpha_default))
            else:
                alpha = float(rank)   # no alpha stored: the diffusers/PEFT convention is scale 1
            try:
                name = kohya_name(component, path, arch)
            except TrainerError:    # not an SGM-mappable path: keep the diffusers-layout kohya name
                name = "lora_unet_" + path.replace(".", "_")
            modules[name] = {"down": down, "up": up, "alpha": alpha}
    return modules, unsupported


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a LoRA (kohya or PEFT/diffusers keys); TrainerError if missing, unreadable or not a LoRA."""
    path = Path(path)
    tensors, metadata = _load(path)
    peft_style = any(k.split(".", 1)[0] in _PEFT_COMPONENTS for k in tensors)
    if peft_style:
        modules, unsupported = _peft_to_modules(tensors, metadata)
        fmt = "peft"
    else:
        modules, unsupported = _parse_kohya(tensors)
        fmt = "kohya"
    if not modules:
        lycoris = any(k.startswith("lora_") and k.partition(".")[2].startswith(_LYCORIS) for k in tensors)
        kind = ("a LyCORIS/DoRA network (LoHa, LoKr, ...), which this tool cannot apply" if lycoris else
                "not a LoRA (no lora_down/lora_up tensors; a full model checkpoint or an embedding?)")
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise TrainerError(f"File '{path.name}' is {kind}; its keys look like: {sample}. Pick a LoRA file.",
                           field="lora")
    return LoraFile(path=path, tensors=tensors, metadata=metadata, modules=modules,
                    unsupported=sorted(unsupported), format=fmt)


# --- applying -----------------------------------------------------------------------------
def _fit(down: torch.Tensor, up: torch.Tensor, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Reshape kohya factors to the PEFT shapes of ``base`` (Linear/Conv2d); None when they cannot fit."""
    w = base.weight
    r = down.shape[0]
    if isinstance(base, nn.Linear):
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            down = down.flatten(1)
        if up.dim() == 4 and up.shape[2:] == (1, 1):
            up = up.flatten(1)
        want_down, want_up = (r, w.shape[1]), (w.shape[0], r)
    else:
        if down.dim() == 2 and w.shape[2:] == (1, 1):
            down = down[:, :, None, None]
        if up.dim() == 2:
            up = up[:, :, None, None]
        want_down, want_up = (r, *w.shape[1:]), (w.shape[0], r, 1, 1)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        return None
    return down, up


def _check_name(name: str) -> None:
    if not name or "." in name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise TrainerError(f"Adapter name {name!r} is not usable; use letters, digits, '-' or '_' (no dots).",
                           field="adapter")


def apply_adapter(components: dict[str, nn.Module], arch: str, lora: LoraFile | str | Path, name: str,
                  weight: float = 1.0) -> list[str]:
    """Attach ``lora`` as adapter ``name`` at ``weight`` (other adapters stay as they are).

    Returns what could not be placed: module names this model lacks, "<name> (shape mismatch)",
    and unsupported keys (LyCORIS/DoRA parts). An existing adapter of that name is replaced.
    """
    _check_name(name)
    lora = lora if isinstance(lora, LoraFile) else read_lora_file(lora)
    delete_adapter(components, name)
    lookup = module_name_map(components, arch, aliases=True)
    unplaced: list[str] = []
    placed: dict[tuple[str, str], tuple[str, torch.Tensor, torch.Tensor, float]] = {}
    for kname, m in lora.modules.items():
        target = lookup.get(kname)
        if target is None:
            unplaced.append(kname)
            continue
        if target in placed:
            unplaced.append(f"{kname} (duplicate of {placed[target][0]})")
            continue
        component, path = target
        base = components[component].get_submodule(path)
        base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
        fitted = _fit(m["down"], m["up"], base)
        if fitted is None:
            unplaced.append(f"{kname} (shape mismatch)")
            continue
        placed[target] = (kname, fitted[0], fitted[1], float(m["alpha"]))
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    for (component, path), (_, down, _, alpha) in placed.items():
        per_component.setdefault(component, {})[path] = (int(down.shape[0]), alpha)
    for component, paths in per_component.items():
        config = lora_config_for(paths, init_lora_weights=False, inference_mode=True)
        inject_peft(components[component], config, name)
    layers = lora_modules(components, name)
    with torch.no_grad():
        for (component, path), (_, down, up, _) in placed.items():
            layer = layers[f"{component}.{path}"][1]
            layer.lora_A[name].weight.copy_(down)
            layer.lora_B[name].weight.copy_(up)
    if placed:
        set_weights(components, {name: weight})
    return unplaced + list(lora.unsupported)


def attached(components: dict[str, nn.Module]) -> list[str]:
    """Names of all adapters present in the components."""
    from peft.tuners.lora import LoraLayer
    return sorted({a for m in components.values() for layer in m.modules() if isinstance(layer, LoraLayer)
                   for a in layer.lora_A})


def set_weights(components: dict[str, nn.Module], weights: dict[str, float]) -> None:
    """Set adapter strengths instantly (scale = weight * alpha / r). 0 turns an adapter off (exact base);
    negative weights subtract it. Adapters not named keep their state."""
    from peft.tuners.lora import LoraLayer
    present = attached(components)
    missing = sorted(set(weights) - set(present))
    if missing:
        raise TrainerError(f"Adapter(s) {', '.join(missing)} are not attached (attached: "
                           f"{', '.join(present) or 'none'}); apply the file first.", field="adapter")
    for model in components.values():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer):
                continue
            active = list(layer.active_adapters)
            for name, w in weights.items():
                if name in layer.lora_A:
                    layer.set_scale(name, float(w))
                    active = [a for a in active if a != name] + ([name] if w != 0 else [])
            set_active(layer, active)


def remove_adapter(components: dict[str, nn.Module], name: str) -> int:
    """Detach adapter ``name`` (no-op if absent); returns how many layers held it."""
    return delete_adapter(components, name)


# --- blending -----------------------------------------------------------------------------
def _as_conv(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.dim() == 2 else t


def blend_files(items: list[tuple[str | Path, float]], out_path: str | Path, metadata_extra: dict | None = None,
                *, dtype: torch.dtype | None = None) -> Path:
    """Blend weighted LoRA files into one kohya file whose effect equals applying them all at once.

    Exact by rank concatenation per module: down = cat(A_i), up = cat(w_i * (alpha_i / r_i) * B_i),
    so the blended scale must be 1: alpha = total rank R. When total ranks differ between modules,
    one alpha (the most common R) is written and each up is multiplied by R_m / alpha, keeping the
    scale exact in every loader (diffusers mis-scales files whose alphas differ per module).
    ``dtype`` defaults to the widest input dtype.
    """
    if not items:
        raise TrainerError("Nothing to blend; give at least one LoRA file with a weight.", field="lora")
    files = [(read_lora_file(p), float(w)) for p, w in items]
    for lf, _ in files:
        if lf.unsupported:
            raise TrainerError(f"'{lf.path.name}' has parts a LoRA blend cannot carry ({lf.unsupported[0]}, ...); "
                               "blend plain LoRA files only.", field="lora")
    versions = {lf.metadata["ss_base_model_version"] for lf, _ in files if lf.metadata.get("ss_base_model_version")}
    if len(versions) > 1:
        raise TrainerError(f"These LoRAs were trained for different base models ({', '.join(sorted(versions))}); "
                           "blend files made for the same model.", field="lora")
    used = [(lf, w) for lf, w in files if w != 0]
    if not used:
        raise TrainerError("All blend weights are 0; give at least one file a non-zero weight.", field="lora")
    downs: dict[str, list[torch.Tensor]] = {}
    ups: dict[str, list[torch.Tensor]] = {}
    for lf, w in used:
        for name, m in lf.modules.items():
            down, up = m["down"].float(), m["up"].float() * (w * m["alpha"] / m["down"].shape[0])
            downs.setdefault(name, []).append(down)
            ups.setdefault(name, []).append(up)
    tensors: dict[str, torch.Tensor] = {}
    ranks = {n: sum(d.shape[0] for d in ds) for n, ds in downs.items()}
    alpha = Counter(ranks.values()).most_common(1)[0][0]
    for name, ds in downs.items():
        us = ups[name]
        if len({d.dim() for d in ds}) > 1 or len({u.dim() for u in us}) > 1:
            ds, us = [_as_conv(d) for d in ds], [_as_conv(u) for u in us]
        if len({tuple(d.shape[1:]) for d in ds}) > 1 or len({u.shape[0] for u in us}) > 1:
            raise TrainerError(f"Module {name} has different shapes in the blended files; they were made for "
                               "different models. Blend files made for the same model.", field="lora")
        tensors[f"{name}.lora_down.weight"] = torch.cat(ds, 0)
        tensors[f"{name}.lora_up.weight"] = torch.cat(us, 1) * (ranks[name] / alpha)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    first = used[0][0].metadata
    keep = ("ss_base_model_version", "ss_v2", "ss_v_parameterization", "ss_sd_model_name", "ss_resolution",
            "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
            "modelspec.prediction_type")
    metadata = {k: first[k] for k in keep if k in first}
    metadata.update({
        "ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks.values())),
        "ss_network_alpha": str(float(alpha)), "ss_output_name": Path(out_path).stem,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.title": Path(out_path).stem,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.merged_from": ", ".join(f"{lf.path.parent.name}/{lf.path.name}" for lf, _ in files),
        "lora_trainer.blend": json.dumps([{"file": lf.path.name, "weight": w,
                                           "sshs_model_hash": lf.metadata.get("sshs_model_hash", "")}
                                          for lf, w in files]),
    })
    metadata.update({k: str(v) for k, v in (metadata_extra or {}).items()})
    if dtype is None:
        sizes = [t.dtype for lf, _ in used for m in lf.modules.values() for t in (m["down"], m["up"])]
        dtype = sizes[0] if len(set(sizes)) == 1 else torch.float32
    return save_adapter(out_path, tensors, metadata, dtype=dtype)
