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
from torch import nn

from . import schedules
from ..config import TrainConfig
from ..data.dataset import LoraDataset, collate
from ..data.scan import DatasetReport, scan_dataset
from ..errors import TrainerError
from ..events import Control, Event, Failed, Finished, Listener, Log, Progress, Sample, Saved, Started
from ..files.export import build_metadata, lora_state_dict, save_adapter, save_diffusers_format
from ..network.lora import cast_frozen, describe_group, groups_from_config, inject
from ..models.loader import BaseModel, encode_prompts, load_base_model, make_pipeline

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class _Run:
    """What the loop carries between steps (kept small on purpose)."""

    config: TrainConfig
    base: BaseModel
    run_dir: Path
    emit: Callable[[Event], None]
    started_at: float
    report: DatasetReport
    step: int = 0
    epoch: int = 0


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

    run: _Run | None = None
    try:
        config.check()
        run = _setup(config, base, emit)
        return _loop(run, control)
    except TrainerError as err:
        emit(Failed(message=str(err), step=run.step if run else 0))
        raise
    except Exception as err:  # an unexpected failure: keep what was learned, tell the user
        step = run.step if run else 0
        saved = _save_interrupted(run) if run and run.step > 0 else None
        note = f" The adapter so far was saved to {saved}." if saved else ""
        emit(Failed(message=f"Training failed at step {step}: {type(err).__name__}: {err}.{note}", step=step))
        raise


def _setup(config: TrainConfig, base: BaseModel | None, emit: Callable[[Event], None]) -> _Run:
    # The dataset is checked before the (slow) model load so its errors come first.
    report = scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=config.resolution or 512)
    if base is None:
        emit(Log(f"loading base model {config.model!r}"))
        base = load_base_model(config.model, arch=config.arch, prediction_type=config.prediction_type)
    if not config.resolution:
        config = config.replace(resolution=base.resolution)
        report = scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=config.resolution)
    for warning in report.warnings:
        emit(Log(f"dataset: {warning}"))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    return _Run(config=config, base=base, run_dir=run_dir, emit=emit, started_at=time.time(), report=report)


@dataclass
class _Parts:
    """What ``_prepare`` builds for one run: the network on its device, the data, the optimizer."""

    accelerator: Any
    device: torch.device
    weight_dtype: torch.dtype
    trainable: list[nn.Module]            # components with LoRA parameters (prepared by accelerate)
    params: dict[str, list[nn.Parameter]]  # LoRA parameters by target group
    unet: nn.Module                       # the UNet as accelerate wrapped it (or the frozen one)
    dataset: LoraDataset
    loader: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    noise_gen: torch.Generator
    alphas_cumprod: torch.Tensor          # the noise schedule's, on ``device``
    total: int                            # optimizer steps of the whole run


def _loop(run: _Run, control: Control) -> Path:
    parts = _prepare(run)
    _announce(run, parts)
    t_start = time.perf_counter()
    losses = _train_steps(run, parts, control)
    path = _save(run, final=True)
    run.emit(Finished(path=str(path), steps=run.step, stopped_early=run.step < parts.total,
                      final_loss=losses[-1] if losses else math.nan,
                      seconds=time.perf_counter() - t_start))
    return path


def _prepare(run: _Run) -> _Parts:
    """LoRA injected and cast, data loader, optimizer and LR schedule, all through accelerate."""
    config = run.config
    accelerator = make_accelerator(config)
    device, weight_dtype = accelerator.device, DTYPES[config.mixed_precision]
    torch.manual_seed(config.seed)  # LoRA A init and dataloader order depend on it
    groups, params, trainable = _inject_network(run, device, weight_dtype)
    dataset = LoraDataset(run.report, config.resolution, center_crop=config.center_crop,
                          random_flip=config.random_flip, repeats=config.repeats,
                          caption_dropout=config.caption_dropout, seed=config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                         collate_fn=collate, drop_last=False,
                                         generator=torch.Generator().manual_seed(config.seed))
    total = schedules.total_steps(len(dataset), config.batch_size, config.gradient_accumulation_steps,
                                  config.epochs, config.max_train_steps)
    lr_of = {g.name: g.lr for g in groups}
    optimizer = make_optimizer(config, [{"params": p, "lr": lr_of[n], "name": n} for n, p in params.items()])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedules.lr_multiplier(
        s, schedule=config.lr_scheduler, warmup=config.lr_warmup_steps, total=total))
    prepared = accelerator.prepare(*trainable, optimizer, loader, lr_scheduler)
    optimizer, loader, lr_scheduler = prepared[-3:]
    unet = prepared[trainable.index(run.base.unet)] if run.base.unet in trainable else run.base.unet
    return _Parts(accelerator=accelerator, device=device, weight_dtype=weight_dtype, trainable=trainable,
                  params=params, unet=unet, dataset=dataset, loader=loader, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, noise_gen=torch.Generator(device=device).manual_seed(config.seed),
                  alphas_cumprod=run.base.noise_scheduler.alphas_cumprod.to(device), total=total)


def _inject_network(run: _Run, device, weight_dtype: torch.dtype):
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


def _announce(run: _Run, parts: _Parts) -> None:
    n_params = sum(p.numel() for ps in parts.params.values() for p in ps)
    run.emit(Started(run_dir=str(run.run_dir), total_steps=parts.total, trainable_params=n_params,
                     num_images=run.report.num_images))
    run.emit(Log(f"{run.base.arch} / {run.base.prediction_type}, {n_params:,} trainable parameters, "
                 f"{len(parts.dataset)} samples per epoch, {parts.total} steps, device {parts.device}"))


def _train_steps(run: _Run, parts: _Parts, control: Control) -> deque[float]:
    """Epochs of micro-batches until the step budget or a stop; returns the recent step losses."""
    losses: deque[float] = deque(maxlen=50)
    step_loss, micro = 0.0, 0
    t_start = last_t = time.perf_counter()
    for m in parts.trainable:
        m.train()
    while run.step < parts.total and not control.stop_requested:
        parts.dataset.set_epoch(run.epoch)
        for batch in parts.loader:
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
            step_loss, micro, last_t = 0.0, 0, now
            _between_steps(run, control, parts.total)
            if run.step >= parts.total or control.stop_requested:
                break
        run.epoch += 1
    for m in parts.trainable:
        m.eval()
    return losses


def _micro_step(run: _Run, parts: _Parts, batch: dict) -> float:
    """Forward and backward of one micro-batch; the optimizer steps when accelerate syncs gradients."""
    config, base = run.config, run.base
    with parts.accelerator.accumulate(*parts.trainable):
        loss = diffusion_loss(base, parts.unet, batch, config, base.noise_scheduler, parts.alphas_cumprod,
                              parts.noise_gen, parts.weight_dtype, parts.device)
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
                noise_gen: torch.Generator, weight_dtype: torch.dtype, device) -> torch.Tensor:
    """The loss of one micro-batch: encode images and captions, add noise, predict, weighted MSE.

    All randomness (VAE sample, noise, timesteps) comes from ``noise_gen``.
    """
    pixels = batch["pixel_values"].to(device, dtype=base.vae.dtype)
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.sample(generator=noise_gen)
        latents = _vae_scale(base, latents).to(weight_dtype)
    noise = schedules.sample_noise(latents, config.noise_offset, noise_gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=noise_gen, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    cond = encode_prompts(base, batch["captions"], size=config.resolution)
    with torch.autocast(device_type=device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
        pred = unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(weight_dtype),
                    added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    target = schedules.training_target(scheduler, latents, noise, timesteps, base.prediction_type)
    weights = schedules.min_snr_weights(schedules.snr(alphas_cumprod, timesteps), config.min_snr_gamma,
                                        base.prediction_type)
    return schedules.weighted_mse(pred, target, weights)


def _vae_scale(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    cfg = base.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (latents - shift) * cfg.scaling_factor


def _between_steps(run: _Run, control: Control, total: int) -> None:
    """Periodic and requested saves and samples."""
    cfg = run.config
    if control.take_save() or (cfg.save_every_n_steps and run.step % cfg.save_every_n_steps == 0
                               and run.step < total):
        _save(run, final=False)
    if control.take_sample() or (cfg.sample_every_n_steps and run.step % cfg.sample_every_n_steps == 0):
        _sample(run)


def _enable_checkpointing(base: BaseModel) -> None:
    base.unet.enable_gradient_checkpointing()
    for te in base.text_encoders:
        if any(p.requires_grad for p in te.parameters()):
            te.gradient_checkpointing_enable()
            te.config.use_cache = False


def _metadata(run: _Run) -> dict[str, str]:
    cfg, base = run.config, run.base
    batches = schedules.steps_per_epoch(run.report.num_samples * cfg.repeats, cfg.batch_size, 1)
    return build_metadata(cfg, arch=base.arch, prediction_type=base.prediction_type, base_name=base.name,
                          resolution=cfg.resolution, num_images=run.report.num_images, steps=run.step,
                          epoch=run.epoch, tag_frequency=run.report.tag_frequency,
                          training_started_at=run.started_at,
                          extra={"ss_num_batches_per_epoch": str(batches)})


def _save(run: _Run, *, final: bool) -> Path:
    from ..files.export import GROUPS_KEY, groups_json, portable_copy, projector_metadata

    cfg, base = run.config, run.base
    stem = cfg.name if final else f"{cfg.name}-step{run.step:06d}"
    tensors = lora_state_dict(base.components(), base.arch)
    metadata = {**_metadata(run), **projector_metadata(tensors)}
    if cfg.train_projector:  # list the projector modules actually found, not just "asked for"
        metadata[GROUPS_KEY] = groups_json(groups_from_config(cfg, base.components()))
    path = save_adapter(run.run_dir / f"{stem}.safetensors", tensors, metadata)
    if final and cfg.export_diffusers:
        save_diffusers_format(run.run_dir / f"{stem}-diffusers.safetensors", base.components())
    if final and cfg.export_portable:
        portable, portable_md = portable_copy(tensors, metadata)
        if portable:
            save_adapter(run.run_dir / f"{stem}-portable.safetensors", portable, portable_md)
        else:
            run.emit(Log("no portable copy written: this adapter has only projector modules"))
    run.emit(Saved(step=run.step, path=str(path), final=final))
    return path


def _save_interrupted(run: _Run) -> Path | None:
    """Best effort after an unexpected failure: write the LoRA so far under a distinct name."""
    try:
        tensors = lora_state_dict(run.base.components(), run.base.arch)
        return save_adapter(run.run_dir / f"{run.config.name}-step{run.step:06d}-interrupted.safetensors",
                            tensors, _metadata(run))
    except Exception:  # saving is a courtesy here (save_adapter refuses NaN weights); the original error is reported
        return None


@torch.no_grad()
def _sample(run: _Run) -> None:
    """Render the config's sample prompts with the LoRA as it is now."""
    cfg, base = run.config, run.base
    components = base.components()
    modes = {name: m.training for name, m in components.items()}
    pipe = make_pipeline(base)
    out_dir = run.run_dir / "samples"
    out_dir.mkdir(exist_ok=True)
    paths = []
    try:
        for i, prompt in enumerate(cfg.sample_prompts):
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
            image = pipe(prompt, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                         generator=generator, height=cfg.resolution, width=cfg.resolution).images[0]
            path = out_dir / f"step{run.step:06d}-{i}.png"
            image.save(path)
            paths.append(str(path))
    finally:
        for name, m in components.items():
            m.train(modes[name])
    run.emit(Sample(step=run.step, paths=tuple(paths), prompts=tuple(cfg.sample_prompts)))
