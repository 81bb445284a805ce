"""Single-file SD checkpoints (the original LDM/SGM key layout, as shared on civitai): read, detect, write.

Writing is the inverse of the key rules diffusers' ``from_single_file`` applies on load, so a file we
write loads back in diffusers (and in LDM-based tools) with identical weights.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..errors import TrainerError
from ..fileio import atomic_write

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
V_PRED_KEY = "v_pred"  # marker tensor a v-prediction checkpoint carries (ComfyUI convention)
# ComfyUI's SD2 rule: this bias is spread out (std > 0.09) in the 768 v-prediction models only.
SD2_V_STATISTIC_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


# --- reading and detection ------------------------------------------------------------------------

class _SafetensorsView(Mapping):
    """Read-only mapping over a safetensors file that loads one tensor at a time."""

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """Open a .safetensors (lazily) or .ckpt/.pt (``torch.load``, weights only) as a key -> tensor mapping."""
    path = Path(path)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise TrainerError(f"Model file '{path}' is not a checkpoint (suffix '{path.suffix}'); pass a "
                           f"{', '.join(CHECKPOINT_SUFFIXES)} file or a diffusers model folder.", field="model")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            return _SafetensorsView(safe_open(str(path), framework="pt", device="cpu"))
        data = _torch_load(path)
    except Exception as err:  # any decoder failure means the same thing to the user
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise TrainerError(f"Model file '{path}' cannot be read as a checkpoint ({type(err).__name__}: {reason}); "
                           "re-download it, convert it to .safetensors, or pick another file.", field="model") from err
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise TrainerError(f"Model file '{path}' holds no tensors; it is not a model checkpoint.", field="model")
    return data


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def detect_checkpoint(keys: Iterable[str], tensors: Mapping | None = None) -> tuple[str, str]:
    """Return ``(arch, prediction_type)`` of an LDM/SGM-layout checkpoint from its key names.

    arch: SDXL has two embedders under ``conditioner.embedders`` (OpenCLIP bigG in slot 1); SD2 has the
    OpenCLIP encoder ``cond_stage_model.model``; SD1 the HF CLIP ``cond_stage_model.transformer``.
    prediction type: ``v_prediction`` when the file has a ``v_pred`` key. For SD2 without it, the
    ComfyUI statistic decides when ``tensors`` are given (std of one UNet norm bias > 0.09 means the
    768-v model); otherwise SD2 is assumed to be v-prediction, as the common 2.x 768 models are.
    Everything else is ``epsilon``. Both values can be overridden by the caller.
    """
    keys = set(keys)
    arch = _detect_arch(keys)
    if V_PRED_KEY in keys:
        return arch, "v_prediction"
    if arch != "sd2":
        return arch, "epsilon"
    if tensors is not None and SD2_V_STATISTIC_KEY in keys:
        spread = torch.std(tensors[SD2_V_STATISTIC_KEY].float(), unbiased=False).item()
        return arch, "v_prediction" if spread > 0.09 else "epsilon"
    return arch, "v_prediction"


def _detect_arch(keys: set[str]) -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(SDXL_OPENCLIP_PREFIX):
        return "sdxl"
    if has(SDXL_REFINER_PREFIX):
        raise TrainerError("This checkpoint is an SDXL refiner, which cannot be a LoRA base model; "
                           "use an SDXL base checkpoint.", field="model")
    if has(SD2_OPENCLIP_PREFIX):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise TrainerError(_unknown_arch_message(keys), field="model")


def _unknown_arch_message(keys: set[str]) -> str:
    sample = ", ".join(sorted(keys)[:3])
    if any("lora_" in k or ".lora_A." in k for k in keys):
        return f"This file is a LoRA, not a base model (keys like {sample}); pick a full SD checkpoint."
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return ("This checkpoint has a UNet but no text encoder, so its architecture is unknown; "
                "use a full checkpoint (UNet + VAE + text encoder) or a diffusers folder.")
    return (f"Unknown checkpoint architecture (keys like {sample}); expected an SD1.x, SD2.x or SDXL "
            "checkpoint in the original layout, or pass a diffusers model folder.")


# --- diffusers -> LDM key conversion --------------------------------------------------------------

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# UNet modules the original LDM layout has no slot for (diffusers' encoder_hid_dim projector): a single
# file stores them under their diffusers names, and load_unet_extras puts them back after conversion.
DIFFUSERS_NAMED_UNET = ("encoder_hid_proj",)


def unet_with_extras(tensors: Mapping[str, torch.Tensor], unet_config: dict):
    """The UNet of a single file that stores DIFFUSERS_NAMED_UNET modules, or None when it has none.

    diffusers' converter skips those weights (and would leave them unloaded), so such a UNet is
    converted here with diffusers' own key converter plus the extra weights, then loaded strictly.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefix = "model.diffusion_model."
    names = tuple(f"{prefix}{m}." for m in DIFFUSERS_NAMED_UNET)
    extra = {k[len(prefix):]: tensors[k].float() for k in tensors.keys() if k.startswith(names)}
    if not extra:
        return None
    ldm = {k: tensors[k].float() for k in tensors.keys() if k.startswith(prefix) and not k.startswith(names)}
    state = convert_ldm_unet_checkpoint(ldm, unet_config)
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict({**state, **extra}, strict=True)
    return unet


def _unet_block(prefix: str, kind: str, rest: str) -> str:
    """Attention weights keep their names; resnet parts are renamed (norm1 -> in_layers.0, ...)."""
    if kind == "attentions":
        return f"{prefix}.{rest}"
    part, _, param = rest.partition(".")
    return f"{prefix}.{_RESNET_PARTS[part]}.{param}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """Map one diffusers UNet weight name to its LDM name (without ``model.diffusion_model.``)."""
    n = layers_per_block + 1  # LDM slots per level: the resnets plus the down/upsampler
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        slot = 1 + int(m[1]) * n + int(m[3])  # resnet at .0, its attention at .1
        return _unet_block(f"input_blocks.{slot}.{int(m[2] == 'attentions')}", m[2], m[4])
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        slot = {"resnets": (0, 2), "attentions": (1,)}[m[1]][int(m[2])]  # resnet, attention, resnet
        return _unet_block(f"middle_block.{slot}", m[1], m[3])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        slot = int(m[1]) * n + int(m[3])
        return _unet_block(f"output_blocks.{slot}.{int(m[2] == 'attentions')}", m[2], m[4])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        return f"output_blocks.{block * n + layers_per_block}.{2 if block in up_blocks_with_attention else 1}" \
               f".conv.{m[2]}"
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if key.startswith(tuple(f"{m}." for m in DIFFUSERS_NAMED_UNET)):
        return key
    raise TrainerError(f"UNet weight '{key}' has no place in the LDM checkpoint layout; this UNet cannot be "
                       "saved as a single file (save it as a diffusers folder instead).")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """Map one diffusers AutoencoderKL weight name to its LDM name (without ``first_stage_model.``)."""
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         key):
        side, direction, block, kind, index, rest = m.groups()
        level = int(block) if direction == "down" else num_up_blocks - 1 - int(block)
        if kind == "resnets":
            return f"{side}.{direction}.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{side}.{direction}.{level}.{direction}sample.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_PARTS[m[2]]}.{m[3]}"
    return key.replace("conv_norm_out", "norm_out")


def _vae_to_ldm(state: Mapping[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if ".mid_block.attentions." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + vae_key_to_ldm(key, num_up_blocks)] = value
    return out


def _clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP layout (SD1, SDXL embedder 0): the transformers names under ``prefix``."""
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items()}


_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _openclip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD2, SDXL embedder 1): fused q/k/v ``in_proj``, transposed ``text_projection``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise TrainerError(f"Text encoder weight '{key}' has no place in the OpenCLIP checkpoint layout.")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_ldm_state_dict(arch: str, unet, vae, text_encoders: list, prediction_type: str) -> dict[str, torch.Tensor]:
    """All weights of an SD model under their original single-file names."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise TrainerError(f"UNet layers_per_block={layers!r} (per block) has no LDM single-file layout.")
    unet_state = unet.state_dict()
    with_attention = {int(k.split(".")[1]) for k in unet_state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {UNET_PREFIX + unet_key_to_ldm(k, layers, with_attention): v for k, v in unet_state.items()}
    out.update(_vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types)))
    encoders = [te.state_dict() for te in text_encoders]
    if arch == "sd1":
        out.update(_clip_to_ldm(encoders[0], SD1_CLIP_PREFIX))
    elif arch == "sd2":
        out.update(_openclip_to_ldm(encoders[0], SD2_OPENCLIP_PREFIX))
    elif arch == "sdxl":
        out.update(_clip_to_ldm(encoders[0], SDXL_CLIP_PREFIX))
        out.update(_openclip_to_ldm(encoders[1], SDXL_OPENCLIP_PREFIX))
    else:
        raise TrainerError(f"Unknown architecture '{arch}'; expected sd1, sd2 or sdxl.", field="arch")
    if prediction_type == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    return {k: v.detach().contiguous() for k, v in out.items()}


def write_checkpoint(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Atomically write ``state``: safetensors for ``.safetensors``, else ``torch.save({"state_dict": ...})``."""
    path = Path(path)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise TrainerError(f"Output file '{path}' needs one of the suffixes {', '.join(CHECKPOINT_SUFFIXES)}.")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
