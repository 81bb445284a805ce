"""A diffusers UNet read from its safetensors file(s) one tensor at a time, each converted to the training dtype
as it is read: a bf16 run of an fp32 SD1.5 UNet peaks at the bf16 model plus one tensor (~1.7 GB), where
``from_pretrained(torch_dtype=bf16)`` first holds the whole fp32 state dict beside it (~5 GB). The file is
memory-mapped and the pages already converted are dropped as it goes (mapped pages count in the process's
resident memory until then).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path] | None:
    """The UNet folder's safetensors shard(s), or None when it has none (a .bin checkpoint, a variant only)."""
    if (folder / _WEIGHTS).is_file():
        return [folder / _WEIGHTS]
    index = folder / _INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / n for n in names]
        return files if all(f.is_file() for f in files) else None
    return None


def read_converted(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, floating ones converted to ``dtype``, read one at a time."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        if os.fstat(f.fileno()).st_size <= start:
            return out
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        dropped = 0
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = (start + o for o in info["data_offsets"])
            stored = _DTYPES[info["dtype"]]
            if end > begin:
                view = torch.frombuffer(mapped, dtype=stored, count=(end - begin) // stored.itemsize, offset=begin)
                view = view.reshape(info["shape"])
                out[name] = view.to(dtype) if view.is_floating_point() and stored != dtype else view.clone()
                del view
            else:
                out[name] = torch.empty(info["shape"], dtype=stored)
            done = end // mmap.PAGESIZE * mmap.PAGESIZE
            if done > dropped and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED, dropped, done - dropped)
                dropped = done
    finally:
        mapped.close()
    return out


def stream_unet(folder: Path, dtype: torch.dtype):
    """The UNet of a diffusers ``unet`` folder in ``dtype``, or None when it cannot be read this way (the caller
    then uses ``from_pretrained``): no safetensors file, or names that do not match the config's model."""
    from diffusers import UNet2DConditionModel

    files = weight_files(folder)
    if files is None:
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_converted(path, dtype))
    expected = set(unet.state_dict())
    if set(state) != expected:
        return None
    unet.load_state_dict(state, strict=True, assign=True)
    return unet
