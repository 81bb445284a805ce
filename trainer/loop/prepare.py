"""Everything a run is built from before its first step: the accelerator, the LoRA network injected and cast,
the data pipeline with its caches, the optimizer and LR schedule, and the validation set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import TrainConfig
from ..data.pipeline import DataPipe, attach_latent_cache, attach_text_cache, build_data, model_multiple
from ..errors import TrainerError
from ..events import Log
from ..models.loader import BaseModel, encode_prompts, vae_dtype
from ..network.lora import cast_frozen, describe_group, groups_from_config, inject
from . import distributed, schedules
from .ema import Ema
from .optimizers import make_optimizer, make_scheduler
from .outputs import Run
from .precision import DTYPES
from .validation import build_validation_set, validation_loss



def make_accelerator(config: TrainConfig):
    """An accelerate.Accelerator for this config; fp16 needs a CUDA device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide state; a long-lived process (the web UI) trains many runs
    # with different precisions, so each run starts from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainerError("mixed_precision 'fp16' needs a CUDA GPU and none was found; "
                           "use 'bf16' or 'no' on this machine.", field="mixed_precision")
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise TrainerError(f"accelerate is configured for {kind}, which this trainer does not use: the LoRA weights "
                           "are small, so every process keeps the whole (frozen) model and the loop sums the LoRA "
                           "gradients itself, as DDP does. Run `accelerate config` and choose multi-GPU (or use "
                           "examples/accelerate/multi_gpu.yaml).", field="accelerate")
    return accelerator


@dataclass
class Parts:
    """What ``_prepare`` builds for one run: the network on its device, the data, the optimizer."""

    accelerator: Any
    device: torch.device
    weight_dtype: torch.dtype
    trainable: list[nn.Module]            # components with LoRA parameters
    params: dict[str, list[nn.Parameter]]  # LoRA parameters by target group
    unet: nn.Module
    data: DataPipe                        # dataset, bucket batch sampler, this process's batches, caches
    optimizer: torch.optim.Optimizer      # accelerate's wrapper (mixed-precision scaling)
    lr_scheduler: Any                     # stepped once per optimizer step, whatever the process count
    alphas_cumprod: torch.Tensor          # the noise schedule's, on ``device``
    validate: Callable[[], float] | None  # the validation loss now (None: no validation images)
    total: int                            # optimizer steps of the whole run
    ema: Ema | None = None                # EMA of the LoRA weights (ema_decay > 0)


def prepare(run: Run) -> Parts:
    """LoRA injected and cast, the data, optimizer and LR schedule. Models are not wrapped for DDP: the loop
    sums the LoRA gradients over processes itself (every trained component alike, text encoders included)."""
    config = run.config
    accelerator = make_accelerator(config)
    device, weight_dtype = accelerator.device, DTYPES[config.mixed_precision]
    torch.manual_seed(config.seed)  # LoRA A init and dataloader order depend on it
    groups, params, trainable = _inject_network(run, device, weight_dtype)
    data = _prepare_data(run, device)
    total = schedules.total_steps_for_batches(len(data.sampler), config.gradient_accumulation_steps,
                                              config.epochs, config.max_train_steps)
    lr_of = {g.name: g.lr for g in groups}
    optimizer = make_optimizer(config, [{"params": p, "lr": lr_of[n], "name": n} for n, p in params.items()])
    lr_scheduler = make_scheduler(config, optimizer, total)
    optimizer = accelerator.prepare(optimizer)
    unet = _fast_paths(run, device)
    if config.ema_decay:
        run.ema = Ema([p for ps in params.values() for p in ps], config.ema_decay,
                      "cpu" if config.ema_on_cpu else device)
    return Parts(accelerator=accelerator, device=device, weight_dtype=weight_dtype, trainable=trainable,
                  params=params, unet=unet, data=data, optimizer=optimizer,
                  lr_scheduler=lr_scheduler,
                  alphas_cumprod=run.base.noise_scheduler.alphas_cumprod.to(device), total=total,
                  validate=_validator(run, data, unet, device, weight_dtype), ema=run.ema)


def _fast_paths(run: Run, device: torch.device) -> nn.Module:
    """The UNet the steps call: TF32 matmuls on NVIDIA GPUs, channels-last and torch.compile when asked.
    Attention is diffusers' default, torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""
    config, unet = run.config, run.base.unet
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
        run.emit(Log("UNet in channels-last memory format"))
    if config.torch_compile:
        run.emit(Log("torch.compile: the UNet is compiled during the first steps"))
        return torch.compile(unet)
    return unet


def _prepare_data(run: Run, device) -> DataPipe:
    """Buckets, sampler and loader; the latent and text-encoder caches filled when they are valid."""
    config, base = run.config, run.base
    log = lambda line: run.emit(Log(line))  # noqa: E731
    data = build_data(config, run.report, log=log, multiple=model_multiple(base.unet, base.vae), reg=run.reg,
                      rank=distributed.rank(), world=distributed.world_size())
    attach_latent_cache(data, config, base.vae, device=device, base_name=base.name, run_dir=run.run_dir, log=log,
                        barrier=distributed.barrier)
    attach_text_cache(data, config, lambda captions: encode_prompts(base, captions, size=config.resolution,
                           **config.text_encoding),
                      log=log)
    run.data = data
    return data


def _validator(run: Run, data: DataPipe, unet, device, weight_dtype) -> Callable[[], float] | None:
    if run.held_out is None or not distributed.is_main():   # the main process evaluates; the rest train on
        return None
    vset = build_validation_set(run.held_out, run.config, run.base, device, data.buckets)
    return lambda: validation_loss(vset, run.base, unet, run.config, weight_dtype, device)


def _inject_network(run: Run, device, weight_dtype: torch.dtype):
    """Inject the config's target groups; move the model to ``device`` with frozen weights in
    ``weight_dtype``. Returns (groups, LoRA parameters by group, trainable components)."""
    config, base = run.config, run.base
    components = base.components()
    groups = groups_from_config(config, components)
    for group in groups:
        run.emit(Log(describe_group(group)))
    params = inject(components, groups)
    base.to(device)
    cast_frozen(components, weight_dtype)
    if base.vae.dtype != vae_dtype(weight_dtype):     # fp16 VAEs overflow into NaN latents: fp32 beside fp16
        base.vae.to(dtype=vae_dtype(weight_dtype))
    trainable = [m for name, m in components.items()
                 if any(p.requires_grad for p in m.parameters())]
    if config.gradient_checkpointing:
        _enable_checkpointing(base)
    return groups, params, trainable


def _enable_checkpointing(base: BaseModel) -> None:
    base.unet.enable_gradient_checkpointing()
    for te in base.text_encoders:
        if any(p.requires_grad for p in te.parameters()):
            te.gradient_checkpointing_enable()
            te.config.use_cache = False
