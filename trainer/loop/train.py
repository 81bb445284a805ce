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
from ..data.buckets import add_bucket_table
from ..data.pipeline import buckets_for, model_multiple, scan_regularisation
from ..data.scan import scan_dataset
from ..errors import TrainerError
from ..events import Control, Event, Failed, Finished, Listener, Log, Progress, Started, Validation
from ..models.loader import BaseModel, load_base_model
from .loss import diffusion_loss
from . import distributed, precision, schedules
from .pace import StepPace
from .outputs import Run, check_effect, render_samples, save, save_interrupted
from .records import RunRecord, TensorBoardLog
from .state import Checkpoint, find_checkpoint, load_checkpoint, resume_changes, save_checkpoint
from .optimizers import make_optimizer, set_training_mode
from .prepare import Parts, prepare
from .threads import ThreadShare
from .validation import every_n_steps, split_report

__all__ = ["train", "diffusion_loss", "make_optimizer"]
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)


def train(config: TrainConfig, *, listeners: Iterable[Listener] = (), control: Control | None = None,
          base: BaseModel | None = None, resume: str | Path | None = None) -> Path:
    """Train a LoRA as ``config`` says and return the path of the exported adapter.

    ``base`` lets a caller reuse an already loaded model (it is modified in place: LoRA layers are injected).
    ``resume``: a run folder (its newest complete checkpoint) or a checkpoint folder to continue from.
    Every event also goes to ``<output_dir>/events.jsonl`` and ``status.json``. Raises TrainerError for bad
    input; emits Failed before any raise.
    """
    control = control or Control()
    config.check()
    main = distributed.is_main()         # only the main process writes files and emits events
    record = RunRecord(config.output_dir, append=resume is not None) if main else None
    listeners = [record, *listeners] if main else []
    tensorboard, note = TensorBoardLog.create(config.output_dir) if main else (None, "")
    if tensorboard is not None:
        listeners.append(tensorboard)

    def emit(event: Event) -> None:
        for listener in listeners:
            listener(event)

    run: Run | None = None
    threads = ThreadShare(config.cpu_threads)
    try:
        emit(Log(note))
        emit(Log(threads.describe()))
        run = _setup(config, base, emit, resume)
        run.threads = threads
        return _loop(run, control)
    except TrainerError as err:
        emit(Failed(message=str(err), step=run.step if run else 0))
        raise
    except OUT_OF_MEMORY as err:   # advice, the adapter so far, and the checkpoints already written are kept
        raise _out_of_memory(run, err, emit) from err
    except Exception as err:  # an unexpected failure: keep what was learned, tell the user
        step = run.step if run else 0
        saved = save_interrupted(run) if run and run.step > 0 else None
        note = f" The adapter so far was saved to {saved}." if saved else ""
        emit(Failed(message=f"Training failed at step {step}: {type(err).__name__}: {err}.{note}", step=step))
        raise
    finally:
        threads.close()
        if record is not None:
            record.close()
        if tensorboard is not None:
            tensorboard.close()


def _setup(config: TrainConfig, base: BaseModel | None, emit: Callable[[Event], None],
           resume: str | Path | None) -> Run:
    # The dataset is checked before the (slow) model load so its errors come first.
    report = scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=config.resolution or 512,
                          caption_extension=config.caption_extension)
    picked = None
    if base is None:
        if config.mixed_precision == "auto":
            picked = precision.resolve_before_load(config, precision.device_type())
        setting = picked[0] if picked else config.mixed_precision
        emit(Log(f"loading base model {config.model!r}"))
        base = load_base_model(config.model, arch=config.arch, prediction_type=config.prediction_type,
                               dtype=precision.DTYPES.get(setting, torch.float32))
    if not config.resolution:
        config = config.replace(resolution=base.resolution)
        report = scan_dataset(config.data_dir, trigger_word=config.trigger_word, resolution=config.resolution,
                              caption_extension=config.caption_extension)
    if config.mixed_precision == "auto":    # resolved here, so config.json and a resume name what ran
        chosen, why = picked or precision.resolve("auto", base.unet, precision.device_type())
        config = config.replace(mixed_precision=chosen)
        emit(Log(f"mixed precision: {'fp32' if chosen == 'no' else chosen} ({why}; set mixed_precision to choose)"))
    if config.zero_terminal_snr:
        if base.prediction_type != "v_prediction":
            raise TrainerError(f"zero_terminal_snr needs a v-prediction model and '{config.model}' predicts "
                               f"{base.prediction_type}: at SNR 0 an epsilon target says nothing. Set "
                               "prediction_type=v_prediction (to train the model towards it) or turn "
                               "zero_terminal_snr off.", field="zero_terminal_snr")
        base.noise_scheduler = schedules.zero_terminal_snr_scheduler(base.noise_scheduler)
        emit(Log("zero-terminal SNR: betas rescaled, trailing timesteps for samples"))
    spec = buckets_for(config, model_multiple(base.unet, base.vae))
    if spec is not None:
        add_bucket_table(report, spec)      # size warnings against each image's bucket
    for warning in report.warnings:
        emit(Log(f"dataset: {warning}"))
    checkpoint = _find_resume(config, resume, emit) if resume is not None else None
    report, held_out = split_report(report, config)
    reg = scan_regularisation(config)
    if held_out is not None:
        emit(Log(f"validation: {held_out.num_images} image(s) held out, {report.num_images} train"))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        config.save(run_dir / "config.json")
    return Run(config=config, base=base, run_dir=run_dir, emit=emit, started_at=time.time(), report=report,
               held_out=held_out, reg=reg, resume=checkpoint)


def _find_resume(config: TrainConfig, resume: str | Path, emit: Callable[[Event], None]) -> Checkpoint | None:
    checkpoint, skipped = find_checkpoint(resume)
    for line in skipped:
        emit(Log(f"resume: {line}"))
    if checkpoint is None:
        emit(Log(f"resume: no complete checkpoint in '{resume}'; starting from step 0"))
        return None
    for change in resume_changes(checkpoint.config, config):
        emit(Log(f"resume: changed since the checkpoint: {change}"))
    return checkpoint


def _loop(run: Run, control: Control) -> Path:
    parts = prepare(run)
    if run.resume is not None:
        _restore(run, parts)
    _announce(run, parts)
    t_start = time.perf_counter()
    losses = _train_steps(run, parts, control)
    stopped = run.step < parts.total
    if stopped and distributed.is_main():
        _checkpoint(run, parts)
        run.emit(Log(f"stopped at step {run.step} of {parts.total}; continue with: python -m trainer train "
                     f"--resume {run.run_dir}"))
    set_training_mode(parts.optimizer, False)     # schedule-free: export the averaged weights
    path = save(run, final=True) if distributed.is_main() else run.run_dir / f"{run.config.name}.safetensors"
    if distributed.is_main() and run.config.effect_check:
        if stopped:
            run.emit(Log("effect check skipped: the run was stopped early (run it from the Preview tab or with "
                         f"python -m trainer effect --lora {path})"))
        else:
            check_effect(run, path, lambda: control.stop_requested)
    run.emit(Finished(path=str(path), steps=run.step, stopped_early=stopped,
                      final_loss=losses[-1] if losses else math.nan,
                      seconds=time.perf_counter() - t_start))
    return path


def _restore(run: Run, parts: Parts) -> None:
    ckpt = run.resume
    if ckpt.processes != distributed.world_size():
        raise TrainerError(f"Cannot resume: {ckpt.path} was written by a run on {ckpt.processes} process(es) and "
                           f"this one has {distributed.world_size()}; the data order depends on it. Resume with "
                           f"{ckpt.processes} process(es).", field="resume")
    load_checkpoint(ckpt, run.base.components(), parts.optimizer, parts.lr_scheduler,
                    scaler=getattr(parts.accelerator, "scaler", None), ema=parts.ema)
    run.step, run.epoch, run.position = ckpt.step, ckpt.epoch, ckpt.position
    if run.position >= len(parts.data.sampler):   # saved on an epoch's last batch: start the next epoch
        run.epoch, run.position = run.epoch + 1, 0
    run.emit(Log(f"resumed from {ckpt.path} (step {ckpt.step}, epoch {run.epoch}, batch {run.position} of "
                 f"the epoch)"))


def _checkpoint(run: Run, parts: Parts) -> None:
    cfg = run.config
    path = save_checkpoint(run.run_dir, step=run.step, epoch=run.epoch, position=run.position, config=cfg,
                           processes=distributed.world_size(),
                           components=run.base.components(), optimizer=parts.optimizer,
                           lr_scheduler=parts.lr_scheduler, scaler=getattr(parts.accelerator, "scaler", None),
                           keep=cfg.keep_checkpoints, ema=parts.ema)
    run.emit(Log(f"checkpoint at step {run.step}: {path}"))


def _validate(run: Run, parts: Parts) -> None:
    set_training_mode(parts.optimizer, False)
    loss = parts.validate()
    set_training_mode(parts.optimizer, True)
    run.emit(Validation(step=run.step, loss=loss, images=run.held_out.num_images))


def _announce(run: Run, parts: Parts) -> None:
    n_params = sum(p.numel() for ps in parts.params.values() for p in ps)
    run.emit(Started(run_dir=str(run.run_dir), total_steps=parts.total, trainable_params=n_params,
                     num_images=run.report.num_images))
    run.emit(Log(f"{run.base.arch} / {run.base.prediction_type}, {n_params:,} trainable parameters, "
                 f"{len(parts.data.dataset)} samples per epoch, {parts.total} steps, device {parts.device}"))


def _train_steps(run: Run, parts: Parts, control: Control) -> deque[float]:
    """Epochs of micro-batches until the step budget or a stop; returns the recent step losses."""
    losses: deque[float] = deque(maxlen=50)
    step_loss, pace = 0.0, StepPace()
    last_t = time.perf_counter()
    for m in parts.trainable:
        m.train()
    set_training_mode(parts.optimizer, True)
    every = every_n_steps(run.config, parts.total)
    accum, per_epoch = run.config.gradient_accumulation_steps, len(parts.data.sampler)
    if parts.validate and run.step == 0:
        _validate(run, parts)
    stop = False
    while run.step < parts.total and not stop:
        parts.data.set_epoch(run.epoch)
        parts.data.sampler.skip_next(run.position)     # a resumed epoch continues where it stopped
        for batch, global_n in parts.data.batches():
            run.position += 1
            sync = run.position % accum == 0 or run.position == per_epoch
            step_loss += _micro_step(run, parts, batch, global_n, sync)
            if not sync:
                continue
            run.step += 1
            loss = step_loss / (accum if run.position % accum == 0 else run.position % accum)
            losses.append(loss)
            now = time.perf_counter()
            pace.add(now - last_t)
            run.emit(Progress(step=run.step, total_steps=parts.total, epoch=run.epoch, loss=loss,
                              avg_loss=sum(losses) / len(losses), lr=parts.lr_scheduler.get_last_lr()[0],
                              it_per_s=pace.rate, eta_s=pace.eta(parts.total - run.step)))
            step_loss, last_t = 0.0, now
            changed = run.threads.refresh() if run.threads is not None else None
            if changed:
                run.emit(Log(changed))
            stop = distributed.agree(control.stop_requested, parts.device)
            if parts.validate and (run.step % every == 0 or run.step >= parts.total or stop):
                _validate(run, parts)
            if distributed.is_main():
                _between_steps(run, parts, control)
            if run.step >= parts.total or stop:
                break
        else:
            run.epoch, run.position = run.epoch + 1, 0
    for m in parts.trainable:
        m.eval()
    return losses


def _micro_step(run: Run, parts: Parts, batch: dict | None, global_n: int, sync: bool) -> float:
    """Forward and backward of this process's share of one global micro-batch (its loss pre-divided by the
    global batch size); at ``sync`` the gradients are summed over processes and the optimizer steps.
    Returns the global batch's mean loss."""
    config, base = run.config, run.base
    local_sum, finite = 0.0, True
    if batch is not None:
        loss = diffusion_loss(base, parts.unet, batch, config, base.noise_scheduler, parts.alphas_cumprod,
                              None, parts.weight_dtype, parts.device, text_cache=parts.data.text_cache)
        local_n = len(batch["captions"])
        finite = bool(torch.isfinite(loss))
        if finite:
            parts.accelerator.backward(loss * (local_n / global_n))
            local_sum = loss.item() * local_n
    if distributed.agree(not finite, parts.device):
        raise _non_finite(run, f"the loss became {loss.item()}" if not finite
                          else "the loss became non-finite in another process")
    if sync:
        params = [p for ps in parts.params.values() for p in ps]
        distributed.sum_gradients(params)
        norm = parts.accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            raise _non_finite(run, f"a gradient became {float(norm)}")
        parts.optimizer.step()
        parts.lr_scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.ema is not None:
            parts.ema.update()
    return distributed.sum_value(local_sum, parts.device) / global_n


def _out_of_memory(run: Run | None, err: BaseException, emit: Callable[[Event], None]) -> TrainerError:
    """A run that ran out of memory ends with what would fit instead; the adapter so far is saved."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    step = run.step if run else 0
    kind = "CUDA memory" if isinstance(err, torch.cuda.OutOfMemoryError) else "memory"
    saved = None
    if run is not None and run.step > 0:
        try:
            saved = save_interrupted(run)
        except Exception:    # noqa: BLE001 - still out of memory: the checkpoints below are what is kept
            saved = None
    ckpts = sorted((run.run_dir / "checkpoints").glob("step-*")) if run else []
    kept = f" The last checkpoint, {ckpts[-1].name}, is kept (--resume {run.run_dir})." if ckpts else ""
    note = f" The adapter so far was saved to {saved}." if saved else ""
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    error = TrainerError(f"Out of {kind} at step {step + 1} ({detail}). Settings that use less: batch_size 1 (with "
                         "gradient_accumulation_steps for the same effective batch), gradient_checkpointing on, a "
                         "lower resolution, mixed_precision bf16 and optimizer adamw8bit on a GPU; `python -m trainer "
                         f"estimate` with the same flags predicts each one's peak.{kept}{note}", field="batch_size")
    emit(Failed(message=str(error), step=step))
    return error


def _non_finite(run: Run, what: str) -> TrainerError:
    """The run stops before the bad step touches the weights; checkpoints already written stay."""
    cfg = run.config
    ckpts = sorted((run.run_dir / "checkpoints").glob("step-*"))
    kept = f" The last checkpoint, {ckpts[-1].name}, is kept (--resume {run.run_dir})." if ckpts else ""
    snr = (f", or min_snr_gamma ({cfg.min_snr_gamma:g}) with a zero-terminal-SNR schedule (set it to 0)"
           if cfg.min_snr_gamma else "")
    return TrainerError(f"Training stopped at step {run.step + 1}: {what}. Likely causes: a learning rate too high "
                        f"({cfg.learning_rate:g}; try a third of it), fp16 overflowing (use 'bf16' or 'no'; the VAE "
                        f"stays fp32 unless bf16 is set){snr}.{kept}", field="learning_rate")


def _between_steps(run: Run, parts: Parts, control: Control) -> None:
    """Periodic and requested saves, training-state checkpoints and samples."""
    cfg, total = run.config, parts.total
    if cfg.checkpoint_every_n_steps and run.step % cfg.checkpoint_every_n_steps == 0 and run.step < total:
        _checkpoint(run, parts)
    save_now = control.take_save() or (cfg.save_every_n_steps and run.step % cfg.save_every_n_steps == 0
                                       and run.step < total)
    sample_now = control.take_sample() or (cfg.sample_every_n_steps and run.step % cfg.sample_every_n_steps == 0)
    if save_now or sample_now:
        set_training_mode(parts.optimizer, False)
        if save_now:
            save(run, final=False)
        if sample_now:
            render_samples(run)
        set_training_mode(parts.optimizer, True)
