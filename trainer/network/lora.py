"""Network injection through PEFT: what to adapt (TargetGroup), where (suffix matching, projector discovery),
how (LoraConfig for LoRA/DoRA, LoHaConfig, LoKrConfig). Each group has its own rank, alpha (scale = alpha / rank,
independent of rank; alpha / sqrt(rank) with rsLoRA) and learning rate; adapter weights stay fp32 while the frozen
base may be cast to fp16/bf16 (``cast_frozen``)."""
from __future__ import annotations

import difflib
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from ..config import CONV_TARGETS, NETWORK_TYPES, TrainConfig
from ..errors import TrainerError
from .kohya import adaptable_modules
from .layers import (adapter_parameters, adapters_of, cast_frozen, delete_adapter, lora_modules, presented, set_active,
                     tuner_layers)

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["TargetGroup", "groups_from_config", "describe_group", "find_projectors", "match_group", "exact_pattern",
           "lora_config_for", "peft_config_for", "inject_peft", "inject", "lora_modules", "delete_adapter",
           "set_active", "cast_frozen", "count_trainable"]
NETWORK_LABELS = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass(frozen=True)
class TargetGroup:
    """A set of modules trained with one rank/alpha/learning rate."""

    name: str                              # "unet" | "text_encoder" | "projectors"
    targets: dict[str, tuple[str, ...]]    # component -> module-path suffixes ("attn2.to_q", ...)
    rank: int
    alpha: float
    lr: float
    network: str = "lora"                  # one of config.NETWORK_TYPES
    use_rslora: bool = False               # lora/dora: scale = alpha / sqrt(rank)


# --- groups from the config -------------------------------------------------------------
def _unet_group(config: TrainConfig, components: dict[str, nn.Module]) -> TargetGroup | None:
    if not config.train_unet:
        return None
    return TargetGroup("unet", {"unet": tuple(config.unet_targets)}, config.rank, float(config.alpha),
                       config.learning_rate)


def _text_encoder_group(config: TrainConfig, components: dict[str, nn.Module]) -> TargetGroup | None:
    if not config.train_text_encoder:
        return None
    targets = {c: tuple(config.text_encoder_targets) for c in ("text_encoder", "text_encoder_2")
               if c in components}
    return TargetGroup("text_encoder", targets, config.te_rank, float(config.te_alpha), config.text_encoder_lr)


# Projector layers: modules that map one modality's features into another's space. Every Linear/Conv2d
# at or under these roots is a projector (an image projection is a container of Linears).
PROJECTOR_ROOTS: dict[str, tuple[str, ...]] = {
    "unet": ("encoder_hid_proj",      # text (or image) features -> cross-attention space (encoder_hid_dim)
             "add_embedding"),        # SDXL: pooled text + size conditioning -> time embedding
    "text_encoder": ("text_projection",),     # pooled embedding (CLIPTextModelWithProjection)
    "text_encoder_2": ("text_projection",),   # SDXL's second encoder: the pooled text_embeds
}
PROJECTORS_LOOKED_FOR = ("unet.encoder_hid_proj (a UNet with encoder_hid_dim set, or an IP-Adapter image "
                         "projection), unet.add_embedding.linear_1/linear_2 (SDXL's pooled-text + size "
                         "embedding), text_encoder(_2).text_projection (a CLIPTextModelWithProjection)")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def find_projectors(components: dict[str, nn.Module]) -> dict[str, list[str]]:
    """component -> paths of the projector Linear/Conv2d modules this model has (empty when none)."""
    out: dict[str, list[str]] = {}
    for component, roots in PROJECTOR_ROOTS.items():
        if component not in components:
            continue
        paths = [p for p, _ in adaptable_modules(components[component]) if any(_under(p, r) for r in roots)]
        if paths:
            out[component] = paths
    return out


def _select_projectors(found: dict[str, list[str]], wanted: list[str]) -> dict[str, tuple[str, ...]]:
    """Keep the found projectors that ``wanted`` names ("path", "component.path" or a root such as
    "add_embedding"); an entry that names none of them is a TrainerError listing what exists."""
    if not wanted:
        return {c: tuple(ps) for c, ps in found.items()}
    chosen: dict[str, list[str]] = {}
    for entry in wanted:
        hit = False
        for component, paths in found.items():
            rest = entry[len(component) + 1:] if entry.startswith(component + ".") else entry
            for p in paths:
                if _under(p, rest) or p.endswith("." + rest):
                    hit = True
                    if p not in chosen.setdefault(component, []):
                        chosen[component].append(p)
        if not hit:
            have = ", ".join(f"{c}.{p}" for c, ps in found.items() for p in ps)
            raise TrainerError(f"projector_targets entry {entry!r} names no projector of this model; it has "
                               f"{have}. Use one of those, or leave projector_targets empty for all of them.",
                               field="projector_targets")
    return {c: tuple(ps) for c, ps in chosen.items() if ps}


def _projector_group(config: TrainConfig, components: dict[str, nn.Module]) -> TargetGroup | None:
    if not config.train_projector:
        return None
    found = find_projectors(components)
    if not found:
        raise TrainerError(f"train_projector is on, but this model has no projector layers. Looked for "
                           f"{PROJECTORS_LOOKED_FOR}; found none in {', '.join(components)}. Turn "
                           "train_projector off, or use a model that has one (the built-in model does).",
                           field="train_projector")
    targets = _select_projectors(found, list(config.projector_targets))
    return TargetGroup("projectors", targets, config.proj_rank, float(config.proj_alpha), config.projector_lr)


def _conv_group(config: TrainConfig, components: dict[str, nn.Module]) -> TargetGroup | None:
    """LoCon: the UNet's ResNet convolutions and samplers, with their own rank and alpha."""
    if not config.conv_rank:
        return None
    return TargetGroup("conv", {"unet": CONV_TARGETS}, config.conv_rank, float(config.conv_alpha or config.conv_rank),
                       config.learning_rate)


# Group builders, in order; each returns None when its group is off. A new group is one more builder.
GROUP_BUILDERS: tuple[Callable[[TrainConfig, dict[str, nn.Module]], TargetGroup | None], ...] = (
    _unet_group, _conv_group, _text_encoder_group, _projector_group)


def groups_from_config(config: TrainConfig, components: dict[str, nn.Module]) -> list[TargetGroup]:
    """The target groups ``config`` asks for, in builder order; groups that are off are left out. Every group
    uses the run's network type (``config.network``, ``config.use_rslora``)."""
    return [replace(g, network=config.network, use_rslora=config.use_rslora) for build in GROUP_BUILDERS
            if (g := build(config, components)) is not None]


def describe_group(group: TargetGroup) -> str:
    """One log line: the group, its type, rank/alpha/lr and what it targets (projectors: the modules found)."""
    what = "; ".join(f"{c}: {', '.join(t)}" for c, t in group.targets.items())
    label = NETWORK_LABELS.get(group.network, group.network) + (" (rsLoRA)" if group.use_rslora else "")
    return f"{label} group '{group.name}' (rank {group.rank}, alpha {group.alpha:g}, lr {group.lr:g}) on {what}"


# --- matching -----------------------------------------------------------------------------
def _matches(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def _suggest(paths: list[str], pattern: str, n: int = 5) -> list[str]:
    """A few existing module-name suffixes close to ``pattern`` (for error messages)."""
    tails = sorted({".".join(p.split(".")[-k:]) for p in paths for k in (1, 2)})
    close = difflib.get_close_matches(pattern, tails, n=n, cutoff=0.4)
    return close or tails[:n]


def match_group(group: TargetGroup, components: dict[str, nn.Module]) -> dict[str, list[str]]:
    """component -> module paths (Linear/Conv2d) that ``group``'s suffixes select.

    A suffix that selects nothing in any of the group's components is a TrainerError.
    """
    out: dict[str, list[str]] = {}
    available: list[str] = []
    hits: Counter[str] = Counter()
    for component, suffixes in group.targets.items():
        if component not in components:
            raise TrainerError(f"Target group '{group.name}' names component {component!r}, which this model "
                               f"does not have (it has {', '.join(components)}); remove it from the group.",
                               field=f"{group.name}_targets")
        paths = [p for p, _ in adaptable_modules(components[component])]
        available += paths
        chosen = [p for p in paths if any(_matches(p, s) for s in suffixes)]
        for s in suffixes:
            hits[s] += sum(_matches(p, s) for p in paths)
        if chosen:
            out[component] = chosen
    patterns = sorted({s for suffixes in group.targets.values() for s in suffixes})
    unmatched = [s for s in patterns if hits[s] == 0]
    if unmatched or not out:
        shown = ", ".join(_suggest(available, (unmatched or patterns)[0]))
        raise TrainerError(f"Target group '{group.name}': {', '.join(map(repr, unmatched or patterns))} match no "
                           f"Linear/Conv2d module in {', '.join(group.targets)}; existing names end with e.g. "
                           f"{shown}. Fix the {group.name} targets.", field=f"{group.name}_targets")
    return out


# --- injection ----------------------------------------------------------------------------
def exact_pattern(path: str) -> str:
    """A PEFT rank/alpha_pattern key matching exactly this module path (PEFT prepends ``(.*\\.)?``)."""
    return "^" + re.escape(path)


def lora_config_for(paths: dict[str, tuple[int, float]], **kwargs) -> LoraConfig:
    """One LoraConfig adapting exactly ``paths`` ({module_path: (rank, alpha)}), per-module patterns."""
    from peft import LoraConfig
    r = Counter(ra[0] for ra in paths.values()).most_common(1)[0][0]
    alpha = Counter(ra[1] for ra in paths.values()).most_common(1)[0][0]
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(paths),
                      rank_pattern={exact_pattern(p): ra[0] for p, ra in paths.items() if ra[0] != r},
                      alpha_pattern={exact_pattern(p): ra[1] for p, ra in paths.items() if ra[1] != alpha},
                      **kwargs)


def peft_config_for(network: str, paths: dict[str, tuple[int, float]], *, use_rslora: bool = False,
                    init: bool = True, inference_mode: bool = False):
    """The PEFT config of ``network`` adapting exactly ``paths`` ({module_path: (rank, alpha)}).

    ``init=True`` is PEFT's default init, whose weight change is zero (LoRA/DoRA: B = 0, DoRA's magnitude =
    ||W||; LoHa: w2_b = 0; LoKr: w1 = 0). LoHa/LoKr convs use the flattened [out, in*k*k] form (no Tucker core),
    the form A1111 and ComfyUI read without hada_t1/t2 or lokr_t2.
    """
    if network not in NETWORK_TYPES:
        raise TrainerError(f"Network type {network!r} is not one of {', '.join(NETWORK_TYPES)}.", field="network")
    if network in ("lora", "dora"):
        return lora_config_for(paths, use_dora=network == "dora", use_rslora=use_rslora, init_lora_weights=init,
                               inference_mode=inference_mode)
    if use_rslora:
        raise TrainerError(f"use_rslora is for lora/dora, not {network}; turn it off.", field="use_rslora")
    from peft import LoHaConfig, LoKrConfig
    r = Counter(ra[0] for ra in paths.values()).most_common(1)[0][0]
    alpha = Counter(ra[1] for ra in paths.values()).most_common(1)[0][0]
    kind = LoHaConfig if network == "loha" else LoKrConfig
    return kind(r=r, alpha=alpha, target_modules=sorted(paths), init_weights=init, inference_mode=inference_mode,
                rank_pattern={exact_pattern(p): ra[0] for p, ra in paths.items() if ra[0] != r},
                alpha_pattern={exact_pattern(p): ra[1] for p, ra in paths.items() if ra[1] != alpha})


def inject_peft(model: nn.Module, config, adapter_name: str) -> None:
    """peft.inject_adapter_in_model (any network type), keeping the other adapters' active state and requires_grad.

    PEFT activates only the new adapter everywhere and re-flags grads; here every layer keeps
    its previously active adapters and gains ``adapter_name`` where it was added.
    """
    from peft import inject_adapter_in_model
    layers = list(tuner_layers(model))
    before = {id(m): list(m.active_adapters) for m in layers}
    flags = [(p, p.requires_grad) for m in layers for a in adapters_of(m) for p in adapter_parameters(m, a)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*attribute in the model.*")
        with presented(model, config):
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for p, flag in flags:
        p.requires_grad_(flag)
    new_flag = not config.inference_mode
    for m in tuner_layers(model):
        names = adapters_of(m)
        active = [a for a in before.get(id(m), []) if a in names and a != adapter_name]
        if adapter_name in names:
            for p in adapter_parameters(m, adapter_name):
                p.requires_grad_(new_flag)
            active.append(adapter_name)
        set_active(m, active)


def inject(components: dict[str, nn.Module], groups: Iterable[TargetGroup],
           adapter_name: str = "default") -> dict[str, list[nn.Parameter]]:
    """Freeze everything, add adapter ``adapter_name`` of each group's network type (PEFT's default init: the
    weight change is zero, outputs unchanged) for each group.

    Returns group name -> its trainable fp32 adapter parameters (for per-group learning rates).
    """
    groups = list(groups)
    owner: dict[tuple[str, str], TargetGroup] = {}
    for group in groups:
        if group.rank < 1 or group.alpha <= 0:
            raise TrainerError(f"Target group '{group.name}' has rank {group.rank} and alpha {group.alpha}; "
                               "rank must be 1 or more and alpha above 0.",
                               field="rank" if group.name == "unet" else f"{group.name}_rank")
        for component, paths in match_group(group, components).items():
            for path in paths:
                other = owner.setdefault((component, path), group)
                if other is not group:
                    raise TrainerError(f"Module {component}.{path} is targeted by groups '{other.name}' and "
                                       f"'{group.name}'; remove it from one of them.", field=f"{group.name}_targets")
    for model in components.values():
        model.requires_grad_(False)
    delete_adapter(components, adapter_name)
    per_config: dict[tuple[str, str, bool], dict[str, tuple[int, float]]] = {}
    for (component, path), group in owner.items():
        key = (component, group.network, group.use_rslora)
        per_config.setdefault(key, {})[path] = (group.rank, float(group.alpha))
    for (component, network, rslora), paths in per_config.items():
        inject_peft(components[component], peft_config_for(network, paths, use_rslora=rslora), adapter_name)
    layers = lora_modules(components, adapter_name)
    params: dict[str, list[nn.Parameter]] = {g.name: [] for g in groups}
    for (component, path), group in owner.items():
        for p in adapter_parameters(layers[f"{component}.{path}"][1], adapter_name):
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
            params[group.name].append(p)
    return params


def count_trainable(components: dict[str, nn.Module]) -> int:
    """Number of trainable parameter elements across the components (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for model in components.values():
        for p in model.parameters():
            if p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())
