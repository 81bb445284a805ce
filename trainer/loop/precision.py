"""Mixed precision: the dtypes of each setting, and what ``auto`` (the default) picks for a model on a device.

``auto`` is bf16 where bf16 is both supported and faster: on NVIDIA GPUs that have it (Ampere and newer; fp16
with loss scaling on older ones), and on CPUs with native bf16 matrix units (AVX-512-BF16 or AMX) for models big
enough to gain from them. Measured on a 2-core AMD EPYC with AVX-512-BF16 (docs/BENCHMARKS.md): the SD1.5-size
UNet's forward + backward + AdamW step at 128 px takes 1.11 s in bf16 against 1.79 s in fp32, while the built-in
model (a few million parameters) is slower in bf16 (0.092 s against 0.073 s per step: the casts cost more than
the smaller matmuls save). The LoRA weights and their optimizer state stay fp32 either way.
"""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU_BF16_MIN_PARAMS = 200_000_000   # UNets below this train faster in fp32 on a CPU (see above)


def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports bf16 kernels for this CPU (AVX-512-BF16 or AMX), where bf16 matmuls are ~2x fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(setting: str, unet: nn.Module, device_type: str) -> tuple[str, str]:
    """(the precision a run uses, why) for ``setting`` ("auto", "no", "fp16" or "bf16") with this UNet on
    ``device_type`` ("cuda", "cpu", ...). Anything but "auto" is returned as it is."""
    if setting != "auto":
        return setting, "as set"
    if device_type == "cuda":
        if not torch.cuda.is_available():     # an estimate for a GPU made elsewhere
            return "bf16", "assumed for a GPU: bf16 on Ampere and newer"
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU computes bf16"
        return "fp16", "this GPU has no bf16; fp16 with loss scaling"
    if device_type != "cpu":
        return "no", f"fp32 on {device_type}"
    params = sum(p.numel() for p in unet.parameters())
    if not cpu_has_native_bf16():
        return "no", "this CPU has no native bf16 (AVX-512-BF16 or AMX), where fp32 is faster"
    if params < CPU_BF16_MIN_PARAMS:
        return "no", f"a {params / 1e6:.0f}M-parameter UNet trains faster in fp32 on a CPU"
    return "bf16", f"this CPU computes bf16 natively and the UNet has {params / 1e6:.0f}M parameters"


def resolve_before_load(config, device: str) -> tuple[str, str] | None:
    """What "auto" picks for ``config.model``, from its UNet config built on the meta device (no weights read),
    so the weights can be loaded in that dtype; None when the model's configs are not local (a hub id)."""
    from diffusers import UNet2DConditionModel

    from ..errors import TrainerError
    from .trace import model_configs
    try:
        _, folder = model_configs(config.model, config.arch, config.prediction_type)
    except TrainerError:
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    return resolve("auto", unet, device)


def device_type() -> str:
    """The device a run trains on, as accelerate will pick it: CUDA when there is one, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"
