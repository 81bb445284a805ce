"""Writing adapter files: kohya-format tensors, A1111/ComfyUI metadata (ss_*, modelspec.*), hashes.

Files are written atomically. A diffusers/PEFT-format copy, and a portable copy without projector
modules (which tools that do not know them skip), can be written as well.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..config import TrainConfig
from ..errors import TrainerError
from ..fileio import atomic_write_bytes
from ..network.kohya import kohya_name
from ..network.layers import kind_of
from ..network.lora import TargetGroup, groups_from_config, lora_modules
from .parts import layer_parts

GROUPS_KEY = "lora_trainer.target_groups"   # our own key: JSON list of the trained groups
FORMAT_KEY = "lora_trainer.format"
PROJECTORS_KEY = "lora_trainer.projector_modules"   # JSON list of the projector modules in the file
PROJECTOR_NOTE_KEY = "lora_trainer.projector_note"
PORTABLE_KEY = "lora_trainer.portable"
PROJECTOR_NOTE = ("Projector modules (encoder_hid_proj, add_embedding/label_emb, text_projection) are listed in "
                  f"{PROJECTORS_KEY}. Tools that do not know these modules skip them and load the rest as usual "
                  "(diffusers 0.42.1 skips encoder_hid_proj with an 'unexpected keys' warning, loads SDXL's "
                  "label_emb, but raises on text_projection). A <name>-portable.safetensors copy "
                  "(export_portable) leaves them out.")
NETWORK_NOTE_KEY = "lora_trainer.network_note"
# ss_network_args as LyCORIS (lycoris.kohya) writes them for each type; LoRA keeps kohya's networks.lora.
NETWORK_ARGS: dict[str, dict[str, Any]] = {"dora": {"algo": "lora", "dora_wd": True, "wd_on_output": True},
                                           "loha": {"algo": "loha"}, "lokr": {"algo": "lokr", "factor": -1}}
_LYCORIS_NOTE = ("A1111 (its built-in Lora extension), ComfyUI and Forge load it; diffusers 0.42.1 cannot: "
                 "load_lora_weights raises ValueError ('keys have not been correctly renamed'), and kohya "
                 "sd-scripts' networks.lora does not know these keys.")
NETWORK_NOTES = {
    "loha": "LoHa in LyCORIS keys (hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b, alpha; dW = (w1a w1b) * (w2a w2b) "
            "* alpha / r). " + _LYCORIS_NOTE,
    "lokr": "LoKr in LyCORIS keys (lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b, alpha; dW = kron(w1, w2), "
            "times alpha / r only where a factor is low-rank). " + _LYCORIS_NOTE,
    "dora": "DoRA: LoRA keys plus dora_scale, the magnitude per output channel ([out, 1]; LyCORIS wd_on_output), "
            "W' = dora_scale * (W + dW) / ||W + dW|| row by row. Read exactly by this trainer and LyCORIS. ComfyUI "
            "and Forge read this layout but divide by ||W|| instead of ||W + dW|| (ComfyUI PR #15458), so the "
            "effect is slightly off; A1111 reads dora_scale per input channel only and gets it wrong; diffusers "
            "0.42.1 drops dora_scale with a warning and loads a plain LoRA. export_diffusers writes a PEFT-format "
            "copy (lora_magnitude_vector) that diffusers loads exactly.",
}
# kohya names of projector modules: SD1/SD2 diffusers layout, SDXL SGM layout (label_emb) and text projections.
_PROJECTOR_NAME = re.compile(r"^lora_(unet_(encoder_hid_proj|add_embedding|label_emb)|te[12]?_text_projection)(_|$)")
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                   "sdxl": "stable-diffusion-xl-v1-base"}


def lora_state_dict(components: dict[str, nn.Module], arch: str, adapter_name: str = "default",
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS-format tensors of adapter ``adapter_name``: for LoRA lora_down (A), lora_up (B) and alpha
    (0-d, the real alpha); DoRA adds dora_scale, LoHa/LoKr write hada_*/lokr_* (see ``parts.layer_parts``)."""
    unet_config = getattr(components.get("unet"), "config", None)
    out: dict[str, torch.Tensor] = {}
    for key, (component, layer) in lora_modules(components, adapter_name).items():
        name = kohya_name(component, key[len(component) + 1:], arch, unet_config)
        for part, t in layer_parts(layer, adapter_name).items():
            out[f"{name}.{part}"] = t if part == "alpha" else t.to("cpu", dtype).contiguous()
    if not out:
        raise TrainerError(f"No LoRA layers named '{adapter_name}' in the model; inject one before exporting.",
                           field="adapter")
    return out


def is_projector_module(name: str) -> bool:
    """True for the kohya name of a projector module (``lora_unet_encoder_hid_proj``, ``lora_te2_text_projection``)."""
    return bool(_PROJECTOR_NAME.match(name))


def projector_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Sorted kohya names of the projector modules among ``tensors``' keys."""
    return sorted({k.partition(".")[0] for k in tensors if is_projector_module(k.partition(".")[0])})


def without_projectors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` less every projector module: a file every tool loads without complaint."""
    return {k: v for k, v in tensors.items() if not is_projector_module(k.partition(".")[0])}


def groups_json(groups: list[TargetGroup]) -> str:
    """The ``GROUPS_KEY`` value: each group's name, targets (projectors: the modules found), rank, alpha, lr."""
    return json.dumps([{"name": g.name, "targets": {c: list(t) for c, t in g.targets.items()}, "rank": g.rank,
                        "alpha": g.alpha, "lr": g.lr} for g in groups])


def projector_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Metadata keys naming the file's projector modules and how other tools treat them (empty: none)."""
    names = projector_modules(tensors)
    return {PROJECTORS_KEY: json.dumps(names), PROJECTOR_NOTE_KEY: PROJECTOR_NOTE} if names else {}


def portable_copy(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of the portable file: projector modules and the projectors group removed."""
    removed = projector_modules(tensors)
    md = {k: v for k, v in metadata.items() if k not in (PROJECTORS_KEY, PROJECTOR_NOTE_KEY)}
    try:
        md[GROUPS_KEY] = json.dumps([g for g in json.loads(md.get(GROUPS_KEY, "[]")) if g.get("name") != "projectors"])
    except ValueError:
        pass  # not our metadata: leave it
    md[PORTABLE_KEY] = json.dumps({"removed_projector_modules": removed})
    return without_projectors(tensors), md


def write_portable_copy(path: str | Path) -> Path:
    """Write ``<stem>-portable.safetensors`` beside a LoRA file: the same file less its projector modules."""
    from safetensors import safe_open
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    portable, md = portable_copy(tensors, {k: v for k, v in metadata.items() if not k.startswith("sshs_")})
    if not portable:
        raise TrainerError(f"'{path.name}' holds only projector modules, so a portable copy would be empty; "
                           "train the UNet or text encoder as well to have something every tool loads.",
                           field="export_portable")
    weights = [t.dtype for k, t in portable.items() if not k.endswith(".alpha")]
    return save_adapter(path.with_name(f"{path.stem}-portable.safetensors"), portable, md,
                        dtype=weights[0] if len(set(weights)) == 1 else torch.float32)


def _tag_frequency(tag_frequency: dict, data_dir: str) -> dict[str, dict[str, int]]:
    """kohya shape {dataset_dir: {tag: count}}; a flat {tag: count} is put under the data folder's name."""
    if tag_frequency and all(isinstance(v, dict) for v in tag_frequency.values()):
        return {str(k): {str(t): int(c) for t, c in v.items()} for k, v in tag_frequency.items()}
    return {Path(data_dir).name or "dataset": {str(t): int(c) for t, c in (tag_frequency or {}).items()}}


def build_metadata(config: TrainConfig, *, arch: str, prediction_type: str, base_name: str, resolution: int,
                   num_images: int, steps: int, epoch: int, tag_frequency: dict, training_started_at: float,
                   extra: dict | None = None, groups: list[TargetGroup] | None = None) -> dict[str, str]:
    """Metadata A1111, ComfyUI and kohya tools read (all values str; JSON for dict-valued keys).

    ``epoch`` is the loop's 0-based counter of the epoch in progress: the loop advances it only after a
    full epoch and breaks out (step budget, stop) before that, so a run saved at step N > 0 has run
    ``epoch + 1`` epochs, the last possibly in part; ``ss_num_epochs`` and ``ss_epoch`` both say that
    (sd-scripts writes the final epoch number, 1-based, in both), and 0 before the first step.
    ``groups`` (the injected TargetGroups) is listed under our own key; default: from ``config``.
    """
    if arch not in _BASE_VERSION:
        raise TrainerError(f"Architecture {arch!r} is not one of {', '.join(_BASE_VERSION)}.", field="arch")
    v_pred = prediction_type == "v_prediction"
    now = datetime.datetime.now().replace(microsecond=0)
    md: dict[str, Any] = {
        **_network_keys(config),
        **_base_model_keys(arch, v_pred, base_name, resolution),
        **_conditioning_keys(config),
        **_run_keys(config, num_images=num_images, steps=steps, epoch=epoch, tag_frequency=tag_frequency,
                    started_at=training_started_at, now=now),
        **_hyperparameter_keys(config, v_pred),
        **_modelspec_keys(config, arch, v_pred, resolution, now),
        GROUPS_KEY: groups_json(groups if groups is not None else _groups_of(config, arch)),
    }
    if config.trigger_word:
        md["modelspec.trigger_phrase"] = config.trigger_word
    md.update(extra or {})
    return {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            for k, v in md.items()}


def _groups_of(config: TrainConfig, arch: str) -> list[TargetGroup]:
    """The groups ``config`` asks for (builders only look at which components exist; projectors are listed
    as asked for, since no model is at hand)."""
    names = ("unet", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "text_encoder")
    groups = groups_from_config(config.replace(train_projector=False), {n: nn.Identity() for n in names})
    if config.train_projector:
        groups.append(TargetGroup("projectors", {"auto": tuple(config.projector_targets) or ("all found",)},
                                  config.proj_rank, float(config.proj_alpha), config.projector_lr))
    return groups


def _network_keys(config: TrainConfig) -> dict[str, Any]:
    """ss_network_*: the module, the headline dim/alpha (UNet's, else the text encoder's, else the projectors')
    and the other groups' in ss_network_args; LyCORIS types as LyCORIS writes them, with a note on who loads them."""
    dim, alpha = ((config.rank, config.alpha) if config.train_unet else (config.te_rank, config.te_alpha)
                  if config.train_text_encoder else (config.proj_rank, config.proj_alpha))
    args: dict[str, Any] = NETWORK_ARGS.get(config.network, {}).copy()
    if config.train_text_encoder:
        args.update(text_encoder_dim=config.te_rank, text_encoder_alpha=float(config.te_alpha))
    if config.conv_rank:   # kohya's LoCon arguments
        args.update(conv_dim=config.conv_rank, conv_alpha=float(config.conv_alpha or config.conv_rank))
    if config.train_projector:
        args.update(projector_dim=config.proj_rank, projector_alpha=float(config.proj_alpha))
    if config.use_rslora:   # the alpha tensors hold alpha * sqrt(rank), so every reader's alpha / rank is right
        args.update(rslora=True, rslora_alpha=float(alpha))
        alpha = float(alpha) * math.sqrt(dim)
    keys = {
        "ss_network_module": "networks.lora" if config.network == "lora" else "lycoris.kohya",
        "ss_network_dim": dim,
        "ss_network_alpha": float(alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": not config.train_text_encoder,
        "ss_network_train_text_encoder_only": config.train_text_encoder and not (config.train_unet
                                                                                 or config.train_projector),
    }
    if config.network in NETWORK_NOTES:
        keys[NETWORK_NOTE_KEY] = NETWORK_NOTES[config.network]
    return keys


def _base_model_keys(arch: str, v_pred: bool, base_name: str, resolution: int) -> dict[str, Any]:
    return {
        "ss_base_model_version": "sd_v2_v" if arch == "sd2" and v_pred else _BASE_VERSION[arch],
        "ss_v2": arch == "sd2",
        "ss_v_parameterization": v_pred,
        "ss_sd_model_name": base_name,
        "ss_resolution": f"({resolution}, {resolution})",
    }


def _conditioning_keys(config: TrainConfig) -> dict[str, Any]:
    """As sd-scripts writes its unset defaults: "None" for clip skip off and for 75 tokens."""
    return {
        "ss_clip_skip": str(config.clip_skip) if config.clip_skip else "None",
        "ss_max_token_length": str(config.max_token_length) if config.max_token_length != 75 else "None",
    }


def _run_keys(config: TrainConfig, *, num_images: int, steps: int, epoch: int, tag_frequency: dict,
              started_at: float, now: datetime.datetime) -> dict[str, Any]:
    """The dataset and how far the run went (``epoch``: see ``build_metadata``)."""
    epochs_run = epoch + 1 if steps > 0 else 0
    return {
        "ss_num_train_images": num_images,
        "ss_num_batches_per_epoch": max(1, -(-num_images * config.repeats // config.batch_size)),
        "ss_num_epochs": epochs_run,
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * config.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_output_name": config.name,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": now.timestamp(),
        "ss_steps": steps,
        "ss_epoch": epochs_run,
        "ss_max_train_steps": config.max_train_steps,
        "ss_tag_frequency": json.dumps(_tag_frequency(tag_frequency, config.data_dir)),
        "ss_dataset_dirs": json.dumps({Path(config.data_dir).name or "dataset":
                                       {"n_repeats": config.repeats, "img_count": num_images}}),
    }


def _hyperparameter_keys(config: TrainConfig, v_pred: bool) -> dict[str, Any]:
    return {
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate if config.train_unet else 0.0,
        "ss_text_encoder_lr": config.text_encoder_lr if config.train_text_encoder else 0.0,
        "ss_projector_lr": config.projector_lr if config.train_projector else 0.0,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer,
        "ss_mixed_precision": config.mixed_precision,
        "ss_save_precision": config.save_precision,
        "ss_seed": config.seed,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_zero_terminal_snr": config.zero_terminal_snr,
        "ss_noise_offset": config.noise_offset,
        "ss_caption_dropout_rate": config.caption_dropout,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_flip_aug": config.random_flip,
        "ss_prediction_type": "v" if v_pred else "epsilon",
    }


def _modelspec_keys(config: TrainConfig, arch: str, v_pred: bool, resolution: int,
                    now: datetime.datetime) -> dict[str, Any]:
    """The Stability AI model spec keys A1111 and ComfyUI show."""
    spec_arch = "stable-diffusion-v2-768-v" if arch == "sd2" and v_pred else _MODELSPEC_ARCH[arch]
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{spec_arch}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if arch == "sdxl"
                                     else "diffusers"),
        "modelspec.title": config.name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": now.isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them: on a copy whose metadata keeps
    only ss_* keys; model hash = sha256 of the bytes after the header, legacy = 8 hex chars of the
    sha256 of bytes 0x100000..0x110000."""
    data = st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[header:]).hexdigest()
    legacy = hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise TrainerError(f"LoRA tensor {k!r} contains NaN or inf (training diverged); lower the learning "
                               "rate or use an earlier checkpoint.", field="learning_rate")
        out[k] = t.detach().to("cpu", torch.float32 if k.endswith(".alpha") else dtype).contiguous()
    return out


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write a kohya-format LoRA file atomically, adding sshs_model_hash and sshs_legacy_hash.

    Weights are stored as ``dtype`` (alphas stay fp32); if fp16 would overflow, fp32 is used.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TrainerError(f"Adapter path '{path}' must end in .safetensors; rename it.", field="output")
    out = _cast(tensors, dtype)
    if not all(torch.isfinite(t).all() for t in out.values()):
        out = _cast(tensors, torch.float32)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TrainerError(f"Metadata values must be strings; {bad[0]!r} is {type(metadata[bad[0]]).__name__}. "
                           "Convert it with str() or json.dumps().", field="metadata")
    md = dict(metadata)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = safetensors_hashes(out, md)
    data = st_save(out, md)
    return atomic_write_bytes(path, data)


def _peft_meta(layers: list[tuple[str, nn.Module]], adapter_name: str) -> dict[str, Any]:
    """diffusers' lora_adapter_metadata entry (LoraConfig kwargs) for one component."""
    ranks = {p: int(m.r[adapter_name]) for p, m in layers}
    alphas = {p: float(m.lora_alpha[adapter_name]) for p, m in layers}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    meta = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha}}
    for flag in ("use_dora", "use_rslora"):   # one value per component: inject() gives every group the run's type
        if any(getattr(m, flag).get(adapter_name, False) for _, m in layers):
            meta[flag] = True
    return meta


def save_diffusers_format(path: str | Path, components: dict[str, nn.Module],
                          adapter_name: str = "default") -> Path:
    """PEFT/diffusers keys (``unet.<path>.lora_A.weight``, DoRA's ``.lora_magnitude_vector.weight``) with diffusers'
    ``lora_adapter_metadata``, loadable by ``pipe.load_lora_weights``. fp32, atomic. LoRA and DoRA only."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, list[tuple[str, nn.Module]]] = {}
    for key, (component, layer) in lora_modules(components, adapter_name).items():
        kind = kind_of(layer, adapter_name)
        if kind not in ("lora", "dora"):
            raise TrainerError(f"diffusers cannot load {kind} networks, so there is no diffusers-format copy of "
                               f"{component}.{key[len(component) + 1:]}; turn export_diffusers off (the kohya "
                               "file is for A1111/ComfyUI).", field="export_diffusers")
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().float().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().float().cpu().contiguous()
        if kind == "dora":
            magnitude = layer.lora_magnitude_vector[adapter_name].weight
            # ".weight": diffusers reads the UNet's magnitude either way, transformers (text encoders) only so
            tensors[f"{key}.lora_magnitude_vector.weight"] = magnitude.detach().float().cpu().contiguous()
        per_component.setdefault(component, []).append((key[len(component) + 1:], layer))
    if not tensors:
        raise TrainerError(f"No LoRA layers named '{adapter_name}' in the model; inject one before exporting.",
                           field="adapter")
    meta = {f"{c}.{k}": v for c, layers in per_component.items() for k, v in _peft_meta(layers, adapter_name).items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True),
                FORMAT_KEY: "peft"}
    return atomic_write_bytes(Path(path), st_save(tensors, metadata))
