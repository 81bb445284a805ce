"""kohya/A1111 LoRA module naming, both directions: torch module path <-> ``lora_unet_...`` name.
SD1/SD2 UNets keep the diffusers layout, SDXL UNets the SGM/LDM layout sd-scripts trains on (index
rule in shared/FORMATS.md); text-encoder names always carry ``text_model_``."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch import nn

from ..errors import TrainerError

ARCHS = ("sd1", "sd2", "sdxl")

# SDXL base UNet layout, used when no unet_config is given.
_SDXL_DEFAULT = {"layers_per_block": 2,
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}

# diffusers resnet / top-level module -> SGM spelling
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _prefix(component: str, arch: str) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if arch == "sdxl" else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise TrainerError(f"Component {component!r} has no kohya LoRA prefix; use 'unet', 'text_encoder' "
                       "or 'text_encoder_2'.", field="component")


def _cfg(unet_config: Any, key: str) -> Any:
    if unet_config is None:
        return _SDXL_DEFAULT[key]
    if isinstance(unet_config, Mapping):
        return unet_config.get(key, _SDXL_DEFAULT[key])
    return getattr(unet_config, key, _SDXL_DEFAULT[key])


def _layers_per_block(unet_config: Any) -> int:
    lpb = _cfg(unet_config, "layers_per_block")
    if not isinstance(lpb, int):  # per-block tuples are not an SDXL layout
        raise TrainerError(f"UNet layers_per_block={lpb!r} has no SGM naming; only one integer is supported.",
                           field="unet")
    return lpb


def sgm_unet_path(module_path: str, unet_config: Any = None) -> str:
    """Map a diffusers UNet module path to the SGM/LDM path sd-scripts uses for SDXL."""
    for src, dst in _TOP.items():
        if module_path == src or module_path.startswith(src + "."):
            return dst + module_path[len(src):]
    parts = module_path.split(".")
    L = _layers_per_block(unet_config)

    def resnet(rest: list[str]) -> list[str]:
        return _RESNET.get(rest[0], rest[0]).split(".") + rest[1:] if rest else rest

    kind = parts[0]
    if kind == "down_blocks" and len(parts) >= 4:
        b, sub, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if sub == "resnets":
            return ".".join(["input_blocks", str(1 + b * (L + 1) + j), "0"] + resnet(rest))
        if sub == "attentions":
            return ".".join(["input_blocks", str(1 + b * (L + 1) + j), "1"] + rest)
        if sub == "downsamplers" and rest[:1] == ["conv"]:
            return ".".join(["input_blocks", str((b + 1) * (L + 1)), "0", "op"] + rest[1:])
    elif kind == "mid_block" and len(parts) >= 3:
        sub, j, rest = parts[1], int(parts[2]), parts[3:]
        if sub == "resnets":
            return ".".join(["middle_block", str(2 * j)] + resnet(rest))
        if sub == "attentions":
            return ".".join(["middle_block", str(1 + 2 * j)] + rest)
    elif kind == "up_blocks" and len(parts) >= 4:
        b, sub, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if sub == "resnets":
            return ".".join(["output_blocks", str(b * (L + 1) + j), "0"] + resnet(rest))
        if sub == "attentions":
            return ".".join(["output_blocks", str(b * (L + 1) + j), "1"] + rest)
        if sub == "upsamplers":
            has_attn = "CrossAttn" in str(_cfg(unet_config, "up_block_types")[b])
            return ".".join(["output_blocks", str(b * (L + 1) + L), "2" if has_attn else "1"] + rest)
    raise TrainerError(f"UNet module {module_path!r} has no SGM/LDM name; it is not part of an SDXL UNet.",
                       field="unet")


def kohya_name(component: str, module_path: str, arch: str, unet_config: Any = None) -> str:
    """kohya module name (no ``.lora_down.weight`` suffix) of ``component``'s ``module_path``."""
    if arch not in ARCHS:
        raise TrainerError(f"Architecture {arch!r} is not one of {', '.join(ARCHS)}.", field="arch")
    prefix = _prefix(component, arch)
    path = module_path
    if component == "unet":
        if arch == "sdxl":
            path = sgm_unet_path(module_path, unet_config)
    elif not path.startswith("text_model.") and path != "text_projection":
        path = "text_model." + path  # transformers 5 dropped this level from CLIPTextModel
    return prefix + path.replace(".", "_")


def adaptable_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every Linear/Conv2d, treating a PEFT-wrapped layer as the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, BaseTunerLayer):
            if isinstance(child.get_base_layer(), (nn.Linear, nn.Conv2d)):
                yield path, child
        elif isinstance(child, (nn.Linear, nn.Conv2d)):
            yield path, child
        else:
            yield from adaptable_modules(child, path)


def module_name_map(components: dict[str, nn.Module], arch: str, *,
                    aliases: bool = False) -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, module_path) for every Linear/Conv2d of the model.

    ``aliases=True`` also accepts the spellings other tools write, for loading only: UNet names in
    the other layout (diffusers for SDXL, LDM for SD1/SD2 as A1111/ComfyUI accept), ``lora_te_``/
    ``lora_te1_`` for the first encoder, and text-encoder names without ``text_model_`` (what
    diffusers' ``convert_state_dict_to_kohya`` writes).
    """
    unet_config = getattr(components.get("unet"), "config", None)
    out: dict[str, tuple[str, str]] = {}
    extra: dict[str, tuple[str, str]] = {}
    for component, model in components.items():
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            continue
        for path, _ in adaptable_modules(model):
            out[kohya_name(component, path, arch, unet_config)] = (component, path)
            if not aliases:
                continue
            if component == "unet":
                extra["lora_unet_" + path.replace(".", "_")] = (component, path)
                if arch != "sdxl":
                    try:
                        extra["lora_unet_" + sgm_unet_path(path, unet_config).replace(".", "_")] = (component, path)
                    except TrainerError:
                        pass  # a module with no LDM counterpart
                continue
            bare = path.removeprefix("text_model.").replace(".", "_")
            full = "text_model_" + bare if path != "text_projection" else bare
            prefixes = ("lora_te_", "lora_te1_") if component == "text_encoder" else ("lora_te2_",)
            for p in prefixes:
                extra[p + full] = extra[p + bare] = (component, path)
    return {**extra, **out}
