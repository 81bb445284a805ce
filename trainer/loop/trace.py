"""One training step of a config traced on the meta device: the model built from its architecture configs
(no weights read), the config's network injected, then two steps of (encode ->) UNet forward -> loss ->
backward -> optimizer step run on meta tensors under a tensor-lifetime and FLOP tracker.
What comes out is what the step itself allocates at its peak and how many floating-point operations it does;
``estimate`` adds the weights, the process and the device speed.
"""
from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..config import TrainConfig
from ..errors import TrainerError
from .replay import OpLog

__all__ = ["MetaModel", "PeakTracker", "StepTrace", "meta_model", "trace_step", "model_configs"]


class PeakTracker(TorchDispatchMode):
    """Bytes held by the tensors the traced code allocates, now and at the peak, and the operations and FLOPs
    (torch's own per-op formulas) it runs. A storage counts from the op that creates it until Python frees it;
    storages that existed before (weights, buffers) are ``known`` and not counted, so a view of a weight is not
    taken for an allocation. (torch's FlopCounterMode is not used: under gradient checkpointing its module
    hooks keep the recomputed activations alive.)"""

    def __init__(self, known: set[int] | None = None, log: OpLog | None = None):
        super().__init__()
        self.known = set(known or ())
        self.live: dict[int, int] = {}
        self.now = self.peak = self.ops = self.flops = 0
        self.log = log                  # each distinct operation, for timing them for real (replay.py)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        count = flop_registry.get(func._overloadpacket)
        flops = count(*args, **kwargs, out_val=out) if count is not None else _attention_flops(func, args)
        self.flops += flops
        new = 0
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.known:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    new += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        if self.log is not None:
            self.log.add(func, args, kwargs, flops, new)
        return out


def _attention_flops(func, args) -> int:
    """FLOPs of a fused attention kernel (torch's counter has no formula for them): 4*b*h*l*s*d forward, about
    2.5x that backward; 0 for any other operation."""
    name = str(func)
    if "scaled_dot_product" not in name and "attention" not in name:
        return 0
    four = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
    backward = "backward" in name
    if len(four) < (4 if backward else 3):
        return 0
    q, k = (four[1], four[2]) if backward else (four[0], four[1])
    b, h, length, d = q.shape
    return int(4 * b * h * length * k.shape[-2] * d * (2.5 if backward else 1.0))


@contextmanager
def fused_attention():
    """Attention as torch runs it on a real device: a fused kernel that keeps the output and the log-sum-exp,
    not the attention matrix (on the meta device ``scaled_dot_product_attention`` falls back to the math path,
    which would count that matrix). ``PeakTracker`` counts the kernel's FLOPs (``_attention_flops``)."""
    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.device.type != "meta" or attn_mask is not None or kw or query.dim() != 4:  # other threads
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def storages(modules) -> set[int]:
    return {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}


def model_configs(model: str, arch: str = "auto", prediction_type: str = "auto") -> tuple[str, Path]:
    """(arch, a diffusers folder whose unet/vae/text_encoder configs describe ``model``), reading no weights:
    the built-in model's folder, a diffusers folder, or the shipped configs for a single-file checkpoint's
    detected architecture (its tensor names are read, not its tensors)."""
    from ..models.builtin import builtin_folder
    from ..models.loader import _looks_like_hub_id, _shipped_config, _single_file_kind

    spec = str(model).strip()
    path = Path(spec).expanduser()
    if spec == "builtin":
        folder = builtin_folder()
    elif path.is_file():
        arch, prediction_type = _single_file_kind(path.resolve(), arch, prediction_type)
        return arch, _shipped_config(arch, prediction_type)
    elif path.is_dir() and (path / "model_index.json").is_file():
        folder = path
    elif _looks_like_hub_id(spec):
        raise TrainerError(f"Model '{spec}' is a hub id; the estimate reads a model's configs from a local "
                           "folder or file. Download it first (or pass its local path).", field="model")
    else:
        raise TrainerError(f"Model '{spec}' does not exist; pass 'builtin', a .safetensors/.ckpt file or a "
                           "diffusers model folder.", field="model")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    detected = "sdxl" if "text_encoder_2" in index else (
        "sd2" if json.loads((folder / "unet" / "config.json").read_text()).get("use_linear_projection") else "sd1")
    return (detected if arch == "auto" else arch), folder


@dataclass
class MetaModel:
    """The frozen modules of a model on the meta device (shapes and dtypes only)."""

    arch: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    resolution: int                     # native training size in pixels

    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, **dict(zip(("text_encoder", "text_encoder_2"), self.text_encoders))}


def meta_model(arch: str, folder: Path) -> MetaModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if arch == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
        m.eval()
    native = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return MetaModel(arch=arch, unet=unet, vae=vae, text_encoders=encoders, resolution=native)


@dataclass
class StepTrace:
    """What one steady-state training step holds and does, beyond the frozen weights."""

    step_peak: int                      # bytes: activations + gradients + optimizer state + adapter, at the peak
    adapter_bytes: int                  # LoRA parameters (fp32)
    step_flops: int                     # one optimizer step (batch x accumulation), forward + backward
    step_ops: int = 0                   # tensor operations dispatched in one step (each has a fixed cost)
    op_log: OpLog | None = None         # the distinct operations of the traced steps (``trace_steps`` of them)
    trace_steps: int = 2
    encode_peak: int = 0                # bytes: the cache fill's peak (one image / one caption at a time)
    encode_flops_per_image: int = 0     # VAE encode + text encode of one image, for the cache fill
    weight_bytes: dict[str, int] = field(default_factory=dict)   # frozen weights per component, as trained


def trace_step(config: TrainConfig, model: MetaModel, weight_dtype: torch.dtype) -> StepTrace:
    """Inject the config's network into ``model`` (in place), cast it as ``prepare`` does and trace two steps."""
    from ..models.loader import vae_dtype
    from ..network.lora import cast_frozen, groups_from_config, inject
    from .optimizers import make_optimizer

    components = model.components()
    groups = groups_from_config(config, components)
    params = inject(components, groups)
    cast_frozen(components, weight_dtype)
    model.vae.to(dtype=vae_dtype(weight_dtype))
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for te in model.text_encoders:
            if any(p.requires_grad for p in te.parameters()):
                te.gradient_checkpointing_enable()
    flat = [p for ps in params.values() for p in ps]
    adapter = sum(p.numel() * p.element_size() for p in flat)
    frozen = {name: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)
              for name, m in {**components, "vae": model.vae}.items()}
    lr_of = {g.name: g.lr for g in groups}
    optimizer = make_optimizer(config, [{"params": p, "lr": lr_of[n], "name": n} for n, p in params.items()])
    res, b = config.resolution or model.resolution, config.batch_size
    cached_latents = config.cache_latents and config.center_crop
    cached_text = config.cache_text_encoder_outputs and not config.train_text_encoder and not (
        config.caption_dropout or config.shuffle_tags or config.tag_dropout)
    for m in components.values():       # as the loop trains them (checkpointing is active in training mode)
        if any(p.requires_grad for p in m.parameters()):
            m.train()
    tracker = PeakTracker(storages([*components.values(), model.vae]), log=OpLog())
    with fused_attention(), tracker:
        ema = _ema(config, flat)
        for _ in range(2):   # the second step runs with the optimizer state (and EMA) alive
            for _ in range(config.gradient_accumulation_steps):
                loss = _loss(model, res, b, config, encode_image=not cached_latents, encode_text=not cached_text)
                loss.backward()
                del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
    step_flops = tracker.flops // 2
    encode_tracker = PeakTracker(storages([*components.values(), model.vae]))
    with fused_attention(), encode_tracker, torch.no_grad():
        _encode_image(model, res, 1)
        _encode_text(model, 1, config)
    return StepTrace(step_peak=tracker.peak, adapter_bytes=adapter, step_flops=step_flops, step_ops=tracker.ops // 2,
                     op_log=tracker.log, trace_steps=2,
                     encode_peak=encode_tracker.peak,
                     encode_flops_per_image=encode_tracker.flops,
                     weight_bytes=frozen)


def _ema(config: TrainConfig, params):
    if not config.ema_decay or config.ema_on_cpu:
        return None
    from .ema import Ema
    return Ema(params, config.ema_decay)


def _encode_image(model: MetaModel, res: int, b: int) -> torch.Tensor:
    x = torch.zeros(b, 3, res, res, device="meta", dtype=model.vae.dtype)
    return model.vae.encode(x).latent_dist.parameters


def _encode_text(model: MetaModel, b: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled) as the loop conditions the UNet; 150/225 tokens in chunks of 77."""
    chunks = max(1, config.max_token_length // 75)
    ids = torch.zeros(b * chunks, 77, dtype=torch.long, device="meta")
    hidden, pooled = [], None
    for te in model.text_encoders:
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2 if model.arch == "sdxl" else -1].reshape(b, chunks * 77, -1))
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1), pooled


def _loss(model: MetaModel, res: int, b: int, config: TrainConfig, *, encode_image: bool,
          encode_text: bool) -> torch.Tensor:
    """One micro-batch's loss: latents (encoded now, or cached moments), noise, UNet prediction, MSE."""
    unet = model.unet
    dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    side = res // factor
    with torch.no_grad():
        if encode_image:
            moments = _encode_image(model, res, b)
        else:
            moments = torch.zeros(b, 2 * model.vae.config.latent_channels, side, side, device="meta")
        latents = moments[:, : model.vae.config.latent_channels].to(dtype)
    if encode_text:
        with torch.set_grad_enabled(config.train_text_encoder):
            hidden, pooled = _encode_text(model, b, config)
    else:
        dims = sum(te.config.hidden_size for te in model.text_encoders)
        hidden = torch.zeros(b, 77 * max(1, config.max_token_length // 75), dims, device="meta")
        pooled = (torch.zeros(b, model.text_encoders[-1].config.projection_dim, device="meta")
                  if model.arch == "sdxl" else None)
    noise = torch.randn_like(latents)
    t = torch.zeros(b, dtype=torch.long, device="meta")
    extra = None
    if model.arch == "sdxl":
        extra = {"text_embeds": pooled.to(dtype), "time_ids": torch.zeros(b, 6, device="meta", dtype=dtype)}
    pred = unet(latents + noise, t, encoder_hidden_states=hidden.to(dtype), added_cond_kwargs=extra).sample
    return (pred.float() - noise.float()).pow(2).mean()
