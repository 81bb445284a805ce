"""What a run carries between steps (``Run``) and what it writes: adapters at save points and at the end,
the best-effort save after a failure, sample images and the effect check of the final adapter.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig
from ..data.pipeline import DataPipe
from ..data.scan import DatasetReport
from ..events import Effect, Event, Log, Sample, Saved
from ..files.export import (GROUPS_KEY, build_metadata, groups_json, lora_state_dict, portable_copy,
                            projector_metadata, save_adapter, save_diffusers_format)
from ..models.loader import BaseModel, make_pipeline
from ..models.text import prompt_kwargs
from ..network.lora import groups_from_config
from . import schedules

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Run:
    """What the loop carries between steps (kept small on purpose)."""

    config: TrainConfig
    base: BaseModel
    run_dir: Path
    emit: Callable[[Event], None]
    started_at: float
    report: DatasetReport
    step: int = 0
    epoch: int = 0
    data: DataPipe | None = None          # set once the data is built (its buckets go in the metadata)
    held_out: DatasetReport | None = None  # validation images, when the config asks for a validation loss
    reg: DatasetReport | None = None       # regularisation images, when reg_data_dir is set
    resume: Any = None                     # the state.Checkpoint a resumed run continues from
    ema: Any = None                        # ema.Ema when ema_decay is set: exports use its weights
    position: int = 0                      # micro-batches of the current epoch already trained
    threads: Any = None                    # threads.ThreadShare: this process's share of the CPU cores




def run_metadata(run: Run) -> dict[str, str]:
    cfg, base = run.config, run.base
    batches = schedules.steps_per_epoch(run.report.num_samples * cfg.repeats, cfg.batch_size, 1)
    extra = run.data.metadata() if run.data else {"ss_num_batches_per_epoch": str(batches)}
    return build_metadata(cfg, arch=base.arch, prediction_type=base.prediction_type, base_name=base.name,
                          resolution=cfg.resolution, num_images=run.report.num_images, steps=run.step,
                          epoch=run.epoch, tag_frequency=run.report.tag_frequency,
                          training_started_at=run.started_at, extra=extra)


def _exported_tensors(run: Run) -> dict:
    """The LoRA as exported: the EMA weights when EMA is on, else the weights as they are."""
    with run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext():
        # copies: on the CPU in fp32 the state dict shares the parameters' storage, which the swap restores
        return {k: v.clone() for k, v in lora_state_dict(run.base.components(), run.base.arch).items()}


def save(run: Run, *, final: bool) -> Path:
    cfg, base = run.config, run.base
    stem = cfg.name if final else f"{cfg.name}-step{run.step:06d}"
    tensors = _exported_tensors(run)
    metadata = {**run_metadata(run), **projector_metadata(tensors)}
    if cfg.train_projector:  # list the projector modules actually found, not just "asked for"
        metadata[GROUPS_KEY] = groups_json(groups_from_config(cfg, base.components()))
    dtype = SAVE_DTYPES[cfg.save_precision]
    path = save_adapter(run.run_dir / f"{stem}.safetensors", tensors, metadata, dtype=dtype)
    if final and cfg.export_diffusers:
        save_diffusers_format(run.run_dir / f"{stem}-diffusers.safetensors", base.components())
    if final and cfg.export_portable:
        portable, portable_md = portable_copy(tensors, metadata)
        if portable:
            save_adapter(run.run_dir / f"{stem}-portable.safetensors", portable, portable_md, dtype=dtype)
        else:
            run.emit(Log("no portable copy written: this adapter has only projector modules"))
    run.emit(Saved(step=run.step, path=str(path), final=final))
    return path


def save_interrupted(run: Run) -> Path | None:
    """Best effort after an unexpected failure: write the LoRA so far under a distinct name."""
    try:
        tensors = _exported_tensors(run)
        return save_adapter(run.run_dir / f"{run.config.name}-step{run.step:06d}-interrupted.safetensors",
                            tensors, run_metadata(run))
    except Exception:  # saving is a courtesy here (save_adapter refuses NaN weights); the original error is reported
        return None


@torch.no_grad()
def render_samples(run: Run) -> None:
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
            prompt_args = prompt_kwargs(base, prompt, **cfg.text_encoding,
                                        zero_empty_negative=bool(pipe.config.get("force_zeros_for_empty_prompt")))
            image = pipe(**prompt_args, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                         generator=generator, height=cfg.resolution, width=cfg.resolution).images[0]
            path = out_dir / f"step{run.step:06d}-{i}.png"
            image.save(path)
            paths.append(str(path))
    finally:
        for name, m in components.items():
            m.train(modes[name])
    run.emit(Sample(step=run.step, paths=tuple(paths), prompts=tuple(cfg.sample_prompts)))


def check_effect(run: Run, path: Path, should_stop: Callable[[], bool]) -> None:
    """The final adapter's effect check (render/effect.py) on this run's base model, with the training's own
    layers switched off and the saved file attached, as a user loads it; afterwards the file is detached and the
    trained layers are on again (a caller's ``base`` is left as training left it). Never raises: a failure is
    logged and the verdict is unknown."""
    from ..files.adapters import attached, set_weights
    from ..render import effect
    from ..render.generate import Renderer

    cfg, components = run.config, run.base.components()
    made: list[Renderer] = []

    def renderer() -> Renderer:
        if "default" in attached(components):
            set_weights(components, {"default": 0.0})
        made.append(Renderer(run.base))
        return made[0]

    prompts = effect.effect_prompts([item.caption for item in run.report.items], cfg.trigger_word)
    run.emit(Log(f"effect check: {len(prompts)} prompt(s) x strengths {', '.join(f'{w:g}' for w in effect.STRENGTHS)}"
                 f" x {len(effect.SEEDS)} seeds"))
    try:
        result = effect.run(renderer, path, [item.path for item in run.report.items], prompts, run.run_dir,
                            log=lambda message: run.emit(Log(message)), clip_model=cfg.clip_model or None,
                            size=cfg.resolution or None, steps=effect.CHECK_STEPS, guidance=cfg.sample_guidance,
                            text_encoding=cfg.text_encoding, should_stop=should_stop)
    finally:
        if made:
            made[0].detach(path)
        if "default" in attached(components):
            set_weights(components, {"default": 1.0})
    run.emit(Effect(verdict=result.verdict, line=result.line(), advice=result.advice,
                    path=str(run.run_dir / effect.EFFECT_JSON), grid=result.grid))
