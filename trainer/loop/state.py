"""Training-state checkpoints: everything a run needs to continue exactly where it stopped (LoRA weights in
fp32, optimizer, LR schedule, step, epoch and position in the epoch, RNG states, grad scaler), written
atomically into ``<run>/checkpoints/step-NNNNNN/``, verified on read, pruned only after a new one is complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from ..config import TrainConfig, from_dict
from ..errors import TrainerError
from .records import process_exists

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
STATE_VERSION = 1
# Settings a checkpoint's weights, optimizer state or data order depend on: a resume must not change them.
MUST_MATCH = ("model", "arch", "prediction_type", "data_dir", "trigger_word", "caption_extension", "resolution",
              "center_crop", "random_flip", "repeats", "enable_buckets", "bucket_step", "min_bucket_reso",
              "max_bucket_reso", "bucket_no_upscale", "reg_data_dir", "validation_split", "validation_dir",
              "rank", "alpha", "train_unet", "unet_targets", "train_text_encoder", "text_encoder_rank",
              "text_encoder_alpha", "text_encoder_targets", "train_projector", "projector_rank", "projector_alpha",
              "projector_targets", "batch_size", "gradient_accumulation_steps", "optimizer", "seed",
              "network", "use_rslora")


@dataclass
class Checkpoint:
    path: Path
    step: int
    epoch: int
    position: int            # micro-batches of ``epoch`` already trained
    config: TrainConfig
    processes: int = 1       # how many processes trained it (the data order depends on it)


def trainable_tensors(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable parameter, fp32, keyed "component/parameter name"."""
    return {f"{c}/{n}": p.detach().float().cpu().contiguous()
            for c, m in components.items() for n, p in m.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: Path, *, step: int, epoch: int, position: int, config: TrainConfig,
                    components: dict[str, torch.nn.Module], optimizer, lr_scheduler, scaler=None,
                    keep: int = 2, processes: int = 1, ema=None) -> Path:
    """Write ``step-NNNNNN`` into a temporary folder, then rename it into place (a kill mid-write leaves only
    the temporary folder, which is never read); then prune all but the newest ``keep`` complete ones."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {"lora.safetensors": save(trainable_tensors(components)),
             "optimizer.pt": _torch_bytes(optimizer.state_dict()),
             "scheduler.pt": _torch_bytes(lr_scheduler.state_dict()),
             "rng.pt": _torch_bytes(rng_state()),
             "config.json": (config.to_json() + "\n").encode()}
    if scaler is not None:
        files["scaler.pt"] = _torch_bytes(scaler.state_dict())
    if ema is not None:
        files["ema.safetensors"] = save(ema.state_dict())
    for name, data in files.items():
        _write_synced(tmp / name, data)
    state = {"version": STATE_VERSION, "step": step, "epoch": epoch, "position": position, "processes": processes,
             "files": {name: {"bytes": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
                       for name, data in files.items()}}
    _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1).encode())   # written last: marks it complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and temporary folders of dead writers."""
    complete = [p for p in _candidates(root) if verify(p) is None]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _candidates(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


def verify(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint, else why not."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{STATE_FILE} missing or unreadable"
    for name, meta in state.get("files", {}).items():
        try:
            data = (folder / name).read_bytes()
        except OSError:
            return f"{name} missing"
        if len(data) != meta["bytes"] or hashlib.blake2b(data, digest_size=16).hexdigest() != meta["blake2b"]:
            return f"{name} is damaged ({len(data)} of {meta['bytes']} bytes)"
    return None


def find_checkpoint(path: str | Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest complete checkpoint of a run folder (or ``path`` itself when it is a checkpoint folder),
    and a note for every newer one that was skipped because it is incomplete or damaged."""
    path = Path(path)
    folders = [path] if (path / STATE_FILE).exists() or path.name.startswith("step-") else _candidates(
        path / CHECKPOINTS)
    skipped = []
    for folder in reversed(folders):
        problem = verify(folder)
        if problem is None:
            state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
            config = from_dict(json.loads((folder / "config.json").read_text(encoding="utf-8")))
            return Checkpoint(folder, state["step"], state["epoch"], state["position"], config,
                              state.get("processes", 1)), skipped
        skipped.append(f"skipped {folder.name}: {problem}")
    return None, skipped


def resume_changes(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """The settings that differ (allowed ones, for the log); raises for one in ``MUST_MATCH``."""
    old, new = saved.to_dict(), now.to_dict()
    for name in MUST_MATCH:
        if old[name] != new[name]:
            raise TrainerError(f"Cannot resume: {name} was {old[name]!r} in the checkpoint and is {new[name]!r} now; "
                               f"the saved weights and optimizer state need the same {name}. Set it back, or start "
                               "a new run in another folder.", field=name)
    skip = {"output_dir", "version", "name"}
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in skip and old.get(k) != new[k]]


def load_checkpoint(ckpt: Checkpoint, components: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                    scaler=None, ema=None) -> None:
    """Put a checkpoint's weights, optimizer, LR schedule, RNG and scaler state back in place."""
    tensors = load((ckpt.path / "lora.safetensors").read_bytes())
    params = {f"{c}/{n}": p for c, m in components.items() for n, p in m.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing = sorted(set(params) ^ set(tensors))[:3]
        raise TrainerError(f"Checkpoint '{ckpt.path}' does not match this network (e.g. {', '.join(missing)}); "
                           "resume with the settings it was trained with.", field="resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, dtype=p.dtype))
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=False))
    lr_scheduler.load_state_dict(torch.load(ckpt.path / "scheduler.pt", weights_only=False))
    if scaler is not None and (ckpt.path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt.path / "scaler.pt", weights_only=False))
    if ema is not None:
        if not (ckpt.path / "ema.safetensors").is_file():
            raise TrainerError(f"Checkpoint '{ckpt.path}' has no EMA weights but ema_decay is set now; resume "
                               "with ema_decay 0, or start a new run.", field="ema_decay")
        ema.load_state_dict(load((ckpt.path / "ema.safetensors").read_bytes()))
    set_rng_state(torch.load(ckpt.path / "rng.pt", weights_only=False))
