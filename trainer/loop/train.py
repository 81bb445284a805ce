"""The training loop: TrainConfig in, a LoRA .safetensors out, typed events along the way.

Reads straight down: setup (data -> model -> LoRA -> optimizer) -> loop (encode -> noise ->
predict -> loss -> step -> events/control) -> export. Front ends pass listeners and a Control.
"""
from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..config import TrainConfig
from ..data.pipeline import scan_regularisation
from ..data.scan import scan_dataset
from ..errors import TrainerError
from ..events import Control, Event, Failed, Finished, Listener, Log, Progress, Started, Validation
from ..models.loader import BaseModel, load_base_model
from .loss import diffusion_loss
from .outputs import Run, render_samples, save, save_interrupted
from .prepare import Parts, make_optimizer, prepare
from .validation import every_n_steps, split_report

__all__ = ["train", "diffusion_loss", "make_optimizer"]


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


def _loop(run: Run, control: Control) -> Path:
    parts = prepare(run)
    _announce(run, parts)
    t_start = time.perf_counter()
    losses = _train_steps(run, parts, control)
    path = save(run, final=True)
    run.emit(Finished(path=str(path), steps=run.step, stopped_early=run.step < parts.total,
                      final_loss=losses[-1] if losses else math.nan,
                      seconds=time.perf_counter() - t_start))
    return path


def _validate(run: Run, parts: Parts) -> None:
    loss = parts.validate()
    run.emit(Validation(step=run.step, loss=loss, images=run.held_out.num_images))
    run.log_row(step=run.step, validation_loss=loss)


def _announce(run: Run, parts: Parts) -> None:
    n_params = sum(p.numel() for ps in parts.params.values() for p in ps)
    run.emit(Started(run_dir=str(run.run_dir), total_steps=parts.total, trainable_params=n_params,
                     num_images=run.report.num_images))
    run.emit(Log(f"{run.base.arch} / {run.base.prediction_type}, {n_params:,} trainable parameters, "
                 f"{len(parts.data.dataset)} samples per epoch, {parts.total} steps, device {parts.device}"))


def _train_steps(run: Run, parts: Parts, control: Control) -> deque[float]:
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


def _micro_step(run: Run, parts: Parts, batch: dict) -> float:
    """Forward and backward of one micro-batch; the optimizer steps when accelerate syncs gradients."""
    config, base = run.config, run.base
    with parts.accelerator.accumulate(*parts.trainable):
        loss = diffusion_loss(base, parts.unet, batch, config, base.noise_scheduler, parts.alphas_cumprod,
                              None, parts.weight_dtype, parts.device, text_cache=parts.data.text_cache)
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


def _between_steps(run: Run, control: Control, total: int) -> None:
    """Periodic and requested saves and samples."""
    cfg = run.config
    if control.take_save() or (cfg.save_every_n_steps and run.step % cfg.save_every_n_steps == 0
                               and run.step < total):
        save(run, final=False)
    if control.take_sample() or (cfg.sample_every_n_steps and run.step % cfg.sample_every_n_steps == 0):
        render_samples(run)


