"""The training loop: TrainConfig in, a LoRA .safetensors out, typed events along the way.

Reads straight down: setup (data -> model -> LoRA -> optimizer) -> loop (encode -> noise ->
predict -> loss -> step -> events/control) -> export. Front ends pass listeners and a Control.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from . import schedules
from ..config import TrainConfig
from ..data.cache import TextCache
from ..data.pipeline import (DataPipe, attach_latent_cache, attach_text_cache, build_data, model_multiple,
                             scan_regularisation)
from ..data.scan import scan_dataset
from ..errors import TrainerError
from ..events import Control, Event, Failed, Finished, Listener, Log, Progress, Started, Validation
from ..network.lora import cast_frozen, describe_group, groups_from_config, inject
from ..models.loader import BaseModel, encode_prompts, load_base_model
from .outputs import Run, render_samples, save, save_interrupted
from .validation import build_validation_set, every_n_steps, split_report, validation_loss

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    return Accelerator(mixed_precision=config.mixed_precision,
                       gradient_accumulation_steps=config.gradient_accumulation_steps)


def make_optimizer(config: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for (and installed)."""
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainerError("optimizer 'adamw8bit' needs the bitsandbytes package; "
                               "`pip install bitsandbytes` (CUDA only) or use 'adamw'.",
                               field="optimizer") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def train(config: TrainConfig, *, listeners: Iterable[Listener] = (), control: Control | None = None,
          base: BaseModel | None = None) -> Path:
    """Train a LoRA as ``config`` says and return the path of the exported adapter.

    ``base`` lets a caller reuse an already loaded model (it is modified in place: LoRA layers
    are injected). Raises TrainerError for bad input; emits Failed before any raise.
    """
    listeners = list(listeners)
    control = control or Control()

    def emit(event: Event) -> None:
        for listener in listeners:
            listener(event)

    run: Run | None = None
    try:
        config.check()
        run = _setup(config, base, emit)
        return _loop(run, control)
    except TrainerError as err:
        emit(Failed(message=str(err), step=run.step if run else 0))
        raise
    except Exception as err:  # an unexpected failure: keep what was learned, tell the user
        step = run.step if run else 0
        saved = save_interrupted(run) if run and run.step > 0 else None
        note = f" The adapter so far was saved to {saved}." if saved else ""
        emit(Failed(message=f"Training failed at step {step}: {type(err).__name__}: {err}.{note}", step=step))
        raise


def _setup(config: TrainConfig, base: BaseModel | None, emit: Callable[[Event], None]) -> Run:
    # The dataset is checked before the (slow) model load so its errors come first.
    report = scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=config.resolution or 512,
                          caption_extension=config.caption_extension)
    if base is None:
        emit(Log(f"loading base model {config.model!r}"))
        base = load_base_model(config.model, arch=config.arch, prediction_type=config.prediction_type)
    if not config.resolution:
        config = config.replace(resolution=base.resolution)
        report = scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=config.resolution,
                              caption_extension=config.caption_extension)
    for warning in report.warnings:
        emit(Log(f"dataset: {warning}"))
    report, held_out = split_report(report, config)
    reg = scan_regularisation(config)
    if held_out is not None:
        emit(Log(f"validation: {held_out.num_images} image(s) held out, {report.num_images} train"))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    return Run(config=config, base=base, run_dir=run_dir, emit=emit, started_at=time.time(), report=report,
               held_out=held_out, reg=reg)


@dataclass
class _Parts:
    """What ``_prepare`` builds for one run: the network on its device, the data, the optimizer."""

    accelerator: Any
    device: torch.device
    weight_dtype: torch.dtype
    trainable: list[nn.Module]            # components with LoRA parameters (prepared by accelerate)
    params: dict[str, list[nn.Parameter]]  # LoRA parameters by target group
    unet: nn.Module                       # the UNet as accelerate wrapped it (or the frozen one)
    data: DataPipe                        # dataset, bucket batch sampler, loader, caches
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    noise_gen: torch.Generator
    alphas_cumprod: torch.Tensor          # the noise schedule's, on ``device``
    validate: Callable[[], float] | None  # the validation loss now (None: no validation images)
    total: int                            # optimizer steps of the whole run


def _loop(run: Run, control: Control) -> Path:
    parts = _prepare(run)
    _announce(run, parts)
    t_start = time.perf_counter()
    losses = _train_steps(run, parts, control)
    path = save(run, final=True)
    run.emit(Finished(path=str(path), steps=run.step, stopped_early=run.step < parts.total,
                      final_loss=losses[-1] if losses else math.nan,
                      seconds=time.perf_counter() - t_start))
    return path


def _prepare(run: Run) -> _Parts:
    """LoRA injected and cast, data loader, optimizer and LR schedule, all through accelerate."""
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
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedules.lr_multiplier(
        s, schedule=config.lr_scheduler, warmup=config.lr_warmup_steps, total=total))
    prepared = accelerator.prepare(*trainable, optimizer, data.loader, lr_scheduler)
    optimizer, data.loader, lr_scheduler = prepared[-3:]
    unet = prepared[trainable.index(run.base.unet)] if run.base.unet in trainable else run.base.unet
    return _Parts(accelerator=accelerator, device=device, weight_dtype=weight_dtype, trainable=trainable,
                  params=params, unet=unet, data=data, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, noise_gen=torch.Generator(device=device).manual_seed(config.seed),
                  alphas_cumprod=run.base.noise_scheduler.alphas_cumprod.to(device), total=total,
                  validate=_validator(run, data, unet, device, weight_dtype))


def _prepare_data(run: Run, device) -> DataPipe:
    """Buckets, sampler and loader; the latent and text-encoder caches filled when they are valid."""
    config, base = run.config, run.base
    log = lambda line: run.emit(Log(line))  # noqa: E731
    data = build_data(config, run.report, log=log, multiple=model_multiple(base.unet, base.vae), reg=run.reg)
    attach_latent_cache(data, config, base.vae, device=device, base_name=base.name, run_dir=run.run_dir, log=log)
    attach_text_cache(data, config, lambda captions: encode_prompts(base, captions, size=config.resolution,
                           **config.text_encoding),
                      log=log)
    run.data = data
    return data


def _validator(run: Run, data: DataPipe, unet, device, weight_dtype) -> Callable[[], float] | None:
    if run.held_out is None:
        return None
    vset = build_validation_set(run.held_out, run.config, run.base, device, data.buckets)
    return lambda: validation_loss(vset, run.base, unet, run.config, weight_dtype, device)


def _validate(run: Run, parts: _Parts) -> None:
    loss = parts.validate()
    run.emit(Validation(step=run.step, loss=loss, images=run.held_out.num_images))
    run.log_row(step=run.step, validation_loss=loss)


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
    # fp16 VAEs overflow into NaN latents; the VAE stays fp32 unless bf16 is asked for.
    vae_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    if base.vae.dtype != vae_dtype:
        base.vae.to(dtype=vae_dtype)
    trainable = [m for name, m in components.items()
                 if any(p.requires_grad for p in m.parameters())]
    if config.gradient_checkpointing:
        _enable_checkpointing(base)
    return groups, params, trainable


def _announce(run: Run, parts: _Parts) -> None:
    n_params = sum(p.numel() for ps in parts.params.values() for p in ps)
    run.emit(Started(run_dir=str(run.run_dir), total_steps=parts.total, trainable_params=n_params,
                     num_images=run.report.num_images))
    run.emit(Log(f"{run.base.arch} / {run.base.prediction_type}, {n_params:,} trainable parameters, "
                 f"{len(parts.data.dataset)} samples per epoch, {parts.total} steps, device {parts.device}"))


def _train_steps(run: Run, parts: _Parts, control: Control) -> deque[float]:
    """Epochs of micro-batches until the step budget or a stop; returns the recent step losses."""
    losses: deque[float] = deque(maxlen=50)
    step_loss, micro = 0.0, 0
    t_start = last_t = time.perf_counter()
    for m in parts.trainable:
        m.train()
    every = every_n_steps(run.config, parts.total)
    if parts.validate:
        _validate(run, parts)
    while run.step < parts.total and not control.stop_requested:
        parts.data.set_epoch(run.epoch)
        for batch in parts.data.loader:
            step_loss += _micro_step(run, parts, batch)
            micro += 1
            if not parts.accelerator.sync_gradients:
                continue
            run.step += 1
            losses.append(step_loss / micro)
            now = time.perf_counter()
            rate = run.step / max(now - t_start, 1e-9)
            run.emit(Progress(step=run.step, total_steps=parts.total, epoch=run.epoch, loss=step_loss / micro,
                              avg_loss=sum(losses) / len(losses), lr=parts.lr_scheduler.get_last_lr()[0],
                              it_per_s=1.0 / max(now - last_t, 1e-9), eta_s=(parts.total - run.step) / rate))
            run.log_row(step=run.step, loss=step_loss / micro, lr=parts.lr_scheduler.get_last_lr()[0])
            step_loss, micro, last_t = 0.0, 0, now
            if parts.validate and (run.step % every == 0 or run.step >= parts.total or control.stop_requested):
                _validate(run, parts)
            _between_steps(run, control, parts.total)
            if run.step >= parts.total or control.stop_requested:
                break
        run.epoch += 1
    for m in parts.trainable:
        m.eval()
    return losses


def _micro_step(run: Run, parts: _Parts, batch: dict) -> float:
    """Forward and backward of one micro-batch; the optimizer steps when accelerate syncs gradients."""
    config, base = run.config, run.base
    with parts.accelerator.accumulate(*parts.trainable):
        loss = diffusion_loss(base, parts.unet, batch, config, base.noise_scheduler, parts.alphas_cumprod,
                              parts.noise_gen, parts.weight_dtype, parts.device, text_cache=parts.data.text_cache)
        if not torch.isfinite(loss):
            raise TrainerError(f"The loss became {loss.item()} at step {run.step + 1}; lower the "
                               f"learning rate ({config.learning_rate:g}) or use 'bf16' instead "
                               "of 'fp16'.", field="learning_rate")
        parts.accelerator.backward(loss)
        if parts.accelerator.sync_gradients and config.max_grad_norm > 0:
            parts.accelerator.clip_grad_norm_([p for ps in parts.params.values() for p in ps],
                                              config.max_grad_norm)
        parts.optimizer.step()
        parts.lr_scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def diffusion_loss(base: BaseModel, unet, batch: dict, config: TrainConfig, scheduler, alphas_cumprod,
                   noise_gen: torch.Generator, weight_dtype: torch.dtype, device,
                   text_cache: TextCache | None = None) -> torch.Tensor:
    """The loss of one micro-batch: encode images and captions (or read their caches), add noise, predict,
    weighted MSE. SDXL is conditioned on each image's own size and crop (``batch["time_ids"]``).

    All randomness (VAE sample, noise, timesteps) comes from ``noise_gen``.
    """
    with torch.no_grad():
        if "latent_params" in batch:  # cached moments: the same sample as encoding now
            dist = DiagonalGaussianDistribution(batch["latent_params"].to(device, dtype=base.vae.dtype))
        else:
            dist = base.vae.encode(batch["pixel_values"].to(device, dtype=base.vae.dtype)).latent_dist
        latents = _vae_scale(base, dist.sample(generator=noise_gen)).to(weight_dtype)
    noise = schedules.sample_noise(latents, config.noise_offset, noise_gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=noise_gen, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    cond = (text_cache.encode(batch["captions"]) if text_cache is not None
            else encode_prompts(base, batch["captions"], size=config.resolution,
                           **config.text_encoding))
    if "added_cond_kwargs" in cond and "time_ids" in batch:
        extra = cond["added_cond_kwargs"]
        cond["added_cond_kwargs"] = {**extra, "time_ids": batch["time_ids"].to(device, dtype=extra["time_ids"].dtype)}
    with torch.autocast(device_type=device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
        pred = unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(weight_dtype),
                    added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    target = schedules.training_target(scheduler, latents, noise, timesteps, base.prediction_type)
    weights = schedules.min_snr_weights(schedules.snr(alphas_cumprod, timesteps), config.min_snr_gamma,
                                        base.prediction_type)
    if "loss_weights" in batch:   # prior_loss_weight on regularisation samples
        weights = weights * batch["loss_weights"].to(weights.device)
    return schedules.weighted_mse(pred, target, weights)


def _vae_scale(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    cfg = base.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (latents - shift) * cfg.scaling_factor


def _between_steps(run: Run, control: Control, total: int) -> None:
    """Periodic and requested saves and samples."""
    cfg = run.config
    if control.take_save() or (cfg.save_every_n_steps and run.step % cfg.save_every_n_steps == 0
                               and run.step < total):
        save(run, final=False)
    if control.take_sample() or (cfg.sample_every_n_steps and run.step % cfg.sample_every_n_steps == 0):
        render_samples(run)


def _enable_checkpointing(base: BaseModel) -> None:
    base.unet.enable_gradient_checkpointing()
    for te in base.text_encoders:
        if any(p.requires_grad for p in te.parameters()):
            te.gradient_checkpointing_enable()
            te.config.use_cache = False
