"""Reading LoRA files (ours, kohya/A1111, PEFT/diffusers), placing their modules on a model (naming what does not
fit) and applying them as PEFT adapters: live strengths (``set_weights``), several at once, removal."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import TrainerError
from ..network.kohya import kohya_name, module_name_map
from ..network.layers import adapters_of, tuner_layers
from ..network.lora import delete_adapter, inject_peft, lora_modules, peft_config_for, set_active
from .parts import KNOWN_PARTS, load_module, module_from_parts, module_kind, module_rank_alpha, module_shape, part_name

_PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")   # DoRA in PEFT files
_LYCORIS = ("hada_", "lokr_", "dora_scale", "diff", "oft_", "w_norm", "b_norm")   # kohya-named parts


@dataclass
class LoraFile:
    """A LoRA/LyCORIS file read from disk; ``modules`` maps kohya module name -> {"down", "up", "alpha"} for
    LoRA/LoCon (+ "dora_scale" for DoRA), {"kind", "parts", "r", "alpha"} for LoHa/LoKr."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, dict] = field(default_factory=dict)  # see parts.module_from_parts (LoRA/DoRA/LoHa/LoKr)
    unsupported: list[str] = field(default_factory=list)   # keys we cannot apply (OFT, per-input DoRA, ...)
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
    """kohya/LyCORIS-named tensors -> modules (``parts.module_from_parts``) and the keys no module uses."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, t in tensors.items():
        name, _, part = key.partition(".")
        if part_name(part) in KNOWN_PARTS:
            parts.setdefault(name, {})[part_name(part)] = t
        else:
            unsupported.append(key)
    modules = {}
    for name, p in parts.items():
        module, unused = module_from_parts(p)
        if module is not None:
            modules[name] = module
        unsupported += [f"{name}.{k}" for k in unused]
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
        rslora = bool(meta.get(f"{component}.use_rslora"))   # PEFT scale alpha / sqrt(r): kohya alpha * sqrt(r)
        for key, down in sd.items():
            if not key.endswith(".lora_A.weight"):
                if not key.endswith((".lora_B.weight", ".alpha") + _MAGNITUDE):
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
                alpha = float(alpha_pattern.get(pat, alpha_default)) * (math.sqrt(rank) if rslora else 1.0)
            else:
                alpha = float(rank)   # no alpha stored: the diffusers/PEFT convention is scale 1
            try:
                name = kohya_name(component, path, arch)
            except TrainerError:    # not an SGM-mappable path: keep the diffusers-layout kohya name
                name = "lora_unet_" + path.replace(".", "_")
            modules[name] = {"down": down, "up": up, "alpha": alpha}
            magnitude = next((sd[path + m] for m in _MAGNITUDE if path + m in sd), None)
            if magnitude is not None:   # DoRA: PEFT's magnitude per output channel, in kohya's [out, 1(, 1, 1)]
                modules[name]["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (down.dim() - 1))
    return modules, unsupported


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a LoRA (kohya or PEFT/diffusers keys); TrainerError if missing, unreadable or not a LoRA."""
    path = Path(path)
    tensors, metadata = _load(path)
    peft_style = any(k.split(".", 1)[0] in _PEFT_COMPONENTS for k in tensors)
    fmt = "peft" if peft_style else "kohya"
    try:
        modules, unsupported = _peft_to_modules(tensors, metadata) if peft_style else _parse_kohya(tensors)
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as err:  # parts that cannot go together
        raise TrainerError(f"LoRA file '{path.name}' has tensors that do not fit together ({type(err).__name__}: "
                           f"{err}); it is damaged or not a LoRA. Export or download it again.", field="lora") from None
    for name, module in modules.items():
        _check_shapes(path, name, module)
    if not modules:
        lycoris = any(k.startswith("lora_") and k.partition(".")[2].startswith(_LYCORIS) for k in tensors)
        kind = ("a LyCORIS network this tool cannot apply (incomplete LoHa/LoKr/DoRA parts, or OFT, GLoRA, full "
                "diffs, ...)" if lycoris else
                "not a LoRA (no lora_down/lora_up tensors; a full model checkpoint or an embedding?)")
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise TrainerError(f"File '{path.name}' is {kind}; its keys look like: {sample}. Pick a LoRA file.",
                           field="lora")
    return LoraFile(path=path, tensors=tensors, metadata=metadata, modules=modules,
                    unsupported=sorted(unsupported), format=fmt)


def _check_shapes(path: Path, name: str, module: dict) -> None:
    """A module's parts must be able to make a weight change: non-empty, LoRA down [r, in(, k, k)] with up
    [out, r(, 1, 1)], a finite alpha. TrainerError naming the module and its shapes otherwise."""
    if "parts" in module:
        parts = module["parts"]
        ok = all(t.dim() >= 1 and t.numel() > 0 for t in parts.values())
        shapes = ", ".join(f"{k} {_shape(tuple(t.shape))}" for k, t in parts.items())
    else:
        down, up = module["down"], module["up"]
        ok = (down.dim() in (2, 4) and up.dim() == down.dim() and down.numel() > 0 and up.numel() > 0
              and up.shape[1] == down.shape[0])
        shapes = f"lora_down {_shape(tuple(down.shape))}, lora_up {_shape(tuple(up.shape))}"
    if not ok or not math.isfinite(float(module["alpha"])):
        raise TrainerError(f"LoRA file '{path.name}': module {name} has parts that cannot form a weight change "
                           f"({shapes}, alpha {module['alpha']}); the file is damaged. Export or download it again.",
                           field="lora")


# --- placing and applying -----------------------------------------------------------------
def _shape(t: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(n)) for n in t) + "]"


def shapes_fit(file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """True when a file's weight change of ``file_shape`` fits a layer weight of ``model_shape``: same outputs
    and inputs (a 2-D change fits a conv of as many inputs x kernel, as A1111 and ComfyUI reshape it)."""
    def numel(t: tuple[int, ...]) -> int:
        return int(torch.Size(t[1:]).numel())
    if file_shape[0] != model_shape[0] or numel(file_shape) != numel(model_shape):
        return False
    return len(file_shape) <= 2 or len(model_shape) <= 2 or tuple(file_shape) == tuple(model_shape)


@dataclass
class Placement:
    """Where a file's modules go in a model, and what does not fit."""

    targets: dict[str, tuple[str, str]] = field(default_factory=dict)   # kohya name -> (component, path)
    missing: list[str] = field(default_factory=list)                    # names of layers the model lacks
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)   # (name, file, model shape)
    duplicates: list[str] = field(default_factory=list)                 # "<name> (duplicate of <name>)"

    def unplaced(self) -> list[str]:
        """One line per module that cannot be placed."""
        return (self.missing + [f"{n} (shape mismatch: file {_shape(f)} vs model {_shape(m)})"
                                for n, f, m in self.mismatched] + self.duplicates)

    def refusal(self, file_name: str, arch: str, unknown: list[str] = (), file_arch: str | None = None) -> str | None:
        """The message refusing this file (None when everything fits): the shapes that differ, the module
        names the model lacks and the tensors no loader here uses, each named."""
        def shown(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts = []
        if self.mismatched:
            name, f, m = self.mismatched[0]
            more = f" (and {len(self.mismatched) - 1} more modules)" if len(self.mismatched) > 1 else ""
            parts.append(f"shape mismatch in {name}: file {_shape(f)} vs model {_shape(m)}{more}")
        if self.missing:
            parts.append(f"{len(self.missing)} modules name layers this {arch} model does not have "
                         f"({shown(self.missing)})")
        if self.duplicates:
            parts.append(f"modules spelled twice ({shown(self.duplicates)})")
        if unknown:
            parts.append(f"tensors this tool cannot apply ({shown(list(unknown))})")
        if not parts:
            return None
        made = f"; the file looks made for {file_arch}" if file_arch and file_arch not in (arch, "unknown") \
            and arch not in file_arch.split("/") else ""
        return f"LoRA '{file_name}' does not fit this {arch} model: {'; '.join(parts)}{made}. " \
               "Pick a file made for this base model."


def place(components: dict[str, nn.Module], arch: str, shapes: dict[str, tuple[int, ...]]) -> Placement:
    """Place modules ({kohya name: weight shape the file implies}) on the model's Linear/Conv2d layers."""
    lookup = module_name_map(components, arch, aliases=True)
    out = Placement()
    owner: dict[tuple[str, str], str] = {}
    for kname, file_shape in shapes.items():
        target = lookup.get(kname)
        if target is None:
            out.missing.append(kname)
            continue
        if target in owner:
            out.duplicates.append(f"{kname} (duplicate of {owner[target]})")
            continue
        model_shape = tuple(base_layer(components, target).weight.shape)
        if not shapes_fit(tuple(file_shape), model_shape):
            out.mismatched.append((kname, tuple(file_shape), model_shape))
            continue
        owner[target] = kname
        out.targets[kname] = target
    return out


def base_layer(components: dict[str, nn.Module], target: tuple[str, str]) -> nn.Module:
    """The plain Linear/Conv2d at (component, path), under any PEFT wrapper."""
    layer = components[target[0]].get_submodule(target[1])
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def lora_shapes(lora: LoraFile) -> dict[str, tuple[int, ...]]:
    """kohya name -> the weight shape each module changes (LoRA, DoRA, LoHa, LoKr)."""
    return {n: module_shape(m) for n, m in lora.modules.items()}


def _check_name(name: str) -> None:
    if not name or "." in name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise TrainerError(f"Adapter name {name!r} is not usable; use letters, digits, '-' or '_' (no dots).",
                           field="adapter")


def apply_adapter(components: dict[str, nn.Module], arch: str, lora: LoraFile | str | Path, name: str,
                  weight: float = 1.0) -> list[str]:
    """Attach ``lora`` as adapter ``name`` at ``weight`` (other adapters stay as they are), each module through the
    PEFT layer of its type: LoRA/LoCon and DoRA (LoraConfig), LoHa (LoHaConfig), LoKr (LoKrConfig).

    Returns what could not be placed (``Placement.unplaced``: module names this model lacks,
    "<name> (shape mismatch: file [..] vs model [..])") and unsupported keys (parts no PEFT layer holds: a
    per-input-channel dora_scale, DoRA on LoHa/LoKr, OFT, ...). An existing adapter of that name is replaced.
    """
    _check_name(name)
    lora = lora if isinstance(lora, LoraFile) else read_lora_file(lora)
    delete_adapter(components, name)
    placement = place(components, arch, lora_shapes(lora))
    placed = {target: lora.modules[kname] for kname, target in placement.targets.items()}
    per_config: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
    for (component, path), module in placed.items():
        per_config.setdefault((component, module_kind(module)), {})[path] = module_rank_alpha(module)
    for (component, kind), paths in per_config.items():
        config = peft_config_for(kind, paths, init=False, inference_mode=True)
        inject_peft(components[component], config, name)
    layers = lora_modules(components, name)
    for (component, path), module in placed.items():
        load_module(layers[f"{component}.{path}"][1], name, module, base_layer(components, (component, path)))
    if placed:
        set_weights(components, {name: weight})
    return placement.unplaced() + list(lora.unsupported)


def attached(components: dict[str, nn.Module]) -> list[str]:
    """Names of all adapters present in the components."""
    return sorted({a for m in components.values() for layer in tuner_layers(m) for a in adapters_of(layer)})


def set_weights(components: dict[str, nn.Module], weights: dict[str, float]) -> None:
    """Set adapter strengths instantly (scale = weight * alpha / r). 0 turns an adapter off (exact base);
    negative weights subtract it. Adapters not named keep their state."""
    present = attached(components)
    missing = sorted(set(weights) - set(present))
    if missing:
        raise TrainerError(f"Adapter(s) {', '.join(missing)} are not attached (attached: "
                           f"{', '.join(present) or 'none'}); apply the file first.", field="adapter")
    for model in components.values():
        for layer in tuner_layers(model):
            active = list(layer.active_adapters)
            names = adapters_of(layer)
            for name, w in weights.items():
                if name in names:
                    layer.set_scale(name, float(w))
                    active = [a for a in active if a != name] + ([name] if w != 0 else [])
            set_active(layer, active)


def remove_adapter(components: dict[str, nn.Module], name: str) -> int:
    """Detach adapter ``name`` (no-op if absent); returns how many layers held it."""
    return delete_adapter(components, name)


# --- blending -----------------------------------------------------------------------------
def blend_files(items: list[tuple[str | Path, float]], out_path: str | Path, metadata_extra: dict | None = None,
                *, dtype: torch.dtype | None = None) -> Path:
    """Exact blend of weighted LoRA files (rank concatenation); see ``trainer.files.blend.blend``."""
    from .blend import blend_files as exact_blend   # blend builds on this module
    return exact_blend(items, out_path, metadata_extra, dtype=dtype)
