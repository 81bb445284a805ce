"""Pretrain the built-in demo model on CPU: `vae` first, then `unet` (+ text encoder) on frozen
latents, then `export` into trainer/assets/builtin/. Time-budgeted, seeded, resumable:

    python -m trainer.demo.pretrain vae  --out pretrain_runs/demo --minutes 35 [--resume]
    python -m trainer.demo.pretrain unet --out pretrain_runs/demo --minutes 60 [--resume]
    python -m trainer.demo.pretrain export --out pretrain_runs/demo [--dest trainer/assets/builtin]
    python -m trainer.demo.pretrain samples [--dest trainer/assets/builtin] [--grid docs/img/demo_samples.png]

The learning rate follows warm-up then cosine decay over *wall-clock* progress (elapsed/minutes),
so a run fits its budget whatever the machine's speed; `--resume` continues the same schedule.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from trainer.demo import shapes
from trainer.demo.common import BUILTIN
from trainer.demo.pretrain_unet import (SAMPLE_PROMPTS, UnetSettings, build_text_model, build_unet, sample_grid,
                                        train_unet)
from trainer.demo.pretrain_vae import VaeSettings, train_vae


# ------------------------------------------------------------------ export

def export(out: Path, dest: Path = BUILTIN) -> None:
    """Write EMA weights into a diffusers folder: fp16 safetensors (small), loaded back as fp32."""
    from diffusers import AutoencoderKL
    st = torch.load(out / "unet_ckpt.pt", weights_only=False)
    tok, te = build_text_model()
    unet = build_unet()
    unet.load_state_dict(st["ema_unet"]), te.load_state_dict(st["ema_te"])
    vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    vae.register_to_config(scaling_factor=round(st["scaling_factor"], 5))
    dest.mkdir(parents=True, exist_ok=True)
    if dest.resolve() != BUILTIN.resolve():
        for sub in ("tokenizer", "scheduler"):
            shutil.copytree(BUILTIN / sub, dest / sub, dirs_exist_ok=True)
        shutil.copy(BUILTIN / "model_index.json", dest / "model_index.json")
    unet.half().save_pretrained(dest / "unet", safe_serialization=True)
    vae.half().save_pretrained(dest / "vae", safe_serialization=True)
    te.half().save_pretrained(dest / "text_encoder", safe_serialization=True)
    # transformers loads a checkpoint in the dtype its config names: keep the text encoder fp32 at load.
    cfg_path = dest / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for sub in ("unet", "vae"):
        p = dest / sub / "config.json"
        c = json.loads(p.read_text())
        c.pop("_name_or_path", None)  # a local run path means nothing to users
        p.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in dest.rglob("*.safetensors"))
    print(f"exported step {st['step']} EMA weights to {dest} ({total / 1e6:.1f} MB of weights)")


def sample_exported(dest: Path, grid: Path, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> float:
    """Sample SAMPLE_PROMPTS x seeds from an exported folder, write a grid (rows = seeds), return the
    share of images whose colours match their prompt."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(dest), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    from trainer.demo.score import prompt_colour_accuracy
    imgs = sample_grid(pipe, SAMPLE_PROMPTS, list(seeds))
    grid.parent.mkdir(parents=True, exist_ok=True)
    shapes.to_grid(imgs, cols=len(SAMPLE_PROMPTS)).save(grid, optimize=True)
    acc = prompt_colour_accuracy(imgs, SAMPLE_PROMPTS * len(seeds))
    print(f"{len(imgs)} samples -> {grid}; colours match the prompt in {acc:.2f}")
    return acc


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "export", "samples"])
    ap.add_argument("--out", type=Path, default=Path("pretrain_runs/demo"), help="run folder: checkpoints, logs, grids")
    ap.add_argument("--minutes", type=float, default=30.0, help="total training time budget (wall clock)")
    ap.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dest", type=Path, default=BUILTIN, help="export target folder")
    ap.add_argument("--grid", type=Path, default=Path("docs/img/demo_samples.png"), help="samples: grid file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.stage == "vae":
        train_vae(a.out, a.minutes, a.resume, VaeSettings())
    elif a.stage == "unet":
        train_unet(a.out, a.minutes, a.resume, UnetSettings())
    elif a.stage == "export":
        export(a.out, a.dest)
    else:
        sample_exported(a.dest, a.grid)


if __name__ == "__main__":
    main()
