"""The PEFT tuner layers every network type makes (LoRA/DoRA ``lora_A``/``lora_B``/``lora_magnitude_vector``, LoHa
``hada_*``, LoKr ``lokr_*``): which layer holds an adapter (layers nest when types mix: a LoRA preview on a LoHa run),
its parameters and kind, active state, removal, and keeping adapter weights fp32 while the base is cast."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .kohya import adaptable_modules


def chain(module: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers wrapped around one Linear/Conv2d, outermost first (empty for a plain layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    out = []
    while isinstance(module, BaseTunerLayer):
        out.append(module)
        module = module.base_layer
    return out


def tuner_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Every PEFT tuner layer in ``model``, nested ones included."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def adapters_of(layer: nn.Module) -> set[str]:
    """Names of the adapters ``layer`` holds weights for."""
    names: set[str] = set()
    for part in layer.adapter_layer_names:
        names.update(getattr(layer, part, {}).keys())
    return names


def adapter_parameters(layer: nn.Module, name: str) -> list[nn.Parameter]:
    """Adapter ``name``'s parameters in ``layer``, in PEFT's part order (lora_A, lora_B, magnitude; hada_w1_a, ...)."""
    out: list[nn.Parameter] = []
    for part in dict.fromkeys(layer.adapter_layer_names):   # PEFT may list a part twice (DoRA's magnitude)
        container = getattr(layer, part, {})
        if name in container:
            item = container[name]
            out += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    return out


def kind_of(layer: nn.Module, name: str) -> str:
    """"lora", "dora", "loha" or "lokr": the network type of adapter ``name`` in ``layer``."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    if isinstance(layer, LoHaLayer):
        return "loha"
    if isinstance(layer, LoKrLayer):
        return "lokr"
    return "dora" if layer.use_dora.get(name, False) else "lora"


def holder(module: nn.Module, name: str) -> nn.Module | None:
    """The tuner layer around ``module`` that holds adapter ``name`` (None: none does)."""
    return next((layer for layer in chain(module) if name in adapters_of(layer)), None)


def lora_modules(components: dict[str, nn.Module],
                 adapter_name: str = "default") -> dict[str, tuple[str, nn.Module]]:
    """Map "component.module_path" -> (component, PEFT tuner layer) for layers holding ``adapter_name``
    (any network type; where layers nest, the one that holds it)."""
    out = {}
    for component, model in components.items():
        for path, module in adaptable_modules(model):
            layer = holder(module, adapter_name)
            if layer is not None:
                out[f"{component}.{path}"] = (component, layer)
    return out


def _family(config) -> type:
    """The tuner layer class a PEFT config makes (LoraLayer, LoHaLayer or LoKrLayer)."""
    from peft import LoHaConfig, LoKrConfig
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer
    return LoHaLayer if isinstance(config, LoHaConfig) else LoKrLayer if isinstance(config, LoKrConfig) else LoraLayer


@contextmanager
def presented(model: nn.Module, config) -> Iterator[None]:
    """Let PEFT inject ``config`` into layers that already hold adapters of another type.

    PEFT wraps whatever sits at a target path, but its LoRA conv layer cannot wrap a LoHa/LoKr layer (it reads
    ``groups`` off the layer it wraps). So for the duration, each target path shows PEFT the layer of its own
    type from the chain, or else the plain Linear/Conv2d; afterwards the chain is put back around what PEFT made
    (the new layer goes innermost, where every type can sit: each reads its base weight from the plain layer).
    """
    family, moved = _family(config), []
    for path in sorted(config.target_modules):
        outer = model.get_submodule(path)
        layers = chain(outer)
        shown = next((layer for layer in layers if isinstance(layer, family)), None) or (
            layers[-1].base_layer if layers else outer)
        if shown is not outer:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            above = layers[layers.index(shown) - 1] if shown in layers else layers[-1]
            setattr(parent, child, shown)
            moved.append((parent, child, outer, above))
    try:
        yield
    finally:
        for parent, child, outer, above in moved:
            above.base_layer = getattr(parent, child)
            setattr(parent, child, outer)


def _all_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for name in adapters_of(layer) for p in adapter_parameters(layer, name)]


def set_active(layer: nn.Module, names: list[str]) -> None:
    """Set a layer's active adapters without changing any adapter parameter's requires_grad."""
    flags = [(p, p.requires_grad) for p in _all_parameters(layer)]
    layer.set_adapter(names)
    for p, flag in flags:
        p.requires_grad_(flag)


def _unwrap(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Take an adapter-less tuner layer out of the chain at ``path``, keeping whatever it wrapped."""
    outer = model.get_submodule(path)
    if outer is layer:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
        return
    for wrapper in chain(outer):
        if wrapper.base_layer is layer:
            wrapper.base_layer = layer.base_layer
            return


def delete_adapter(components: dict[str, nn.Module], adapter_name: str) -> int:
    """Remove ``adapter_name`` everywhere; layers left with no adapter get what they wrapped back."""
    removed = 0
    for model in components.values():
        before = removed
        for path, module in list(adaptable_modules(model)):
            layer = holder(module, adapter_name)
            if layer is None:
                continue
            active = [a for a in layer.active_adapters if a != adapter_name]
            layer.delete_adapter(adapter_name)
            removed += 1
            if adapters_of(layer):
                set_active(layer, active)
            else:
                _unwrap(model, path, layer)
        if removed > before and isinstance(getattr(model, "peft_config", None), dict):
            model.peft_config.pop(adapter_name, None)
    return removed


def cast_frozen(components: dict[str, nn.Module], dtype: torch.dtype) -> None:
    """Cast every non-adapter floating weight/buffer to ``dtype``; adapter parameters stay (or become) fp32."""
    adapter_ids = {id(p) for model in components.values() for layer in tuner_layers(model)
                   for p in _all_parameters(layer)}
    for model in components.values():
        for p in model.parameters():
            want = torch.float32 if id(p) in adapter_ids else dtype
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)
        for m in model.modules():
            for name, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    setattr(m, name, b.to(dtype))
