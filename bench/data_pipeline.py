"""Measurement: training-step time with the latent and text-encoder caches on and off, side by side in one
process, on the built-in model (its native 64 px) and on an SD1.5-size model built from the shipped configs
(random weights, 256 px). Mixed-size photos-like images, batch 1, buckets on. Reports the median step time
after the first step, the cache fill time (the log's first-run cost) and peak RSS. Results: docs/BENCHMARKS.md.

    python bench/data_pipeline.py --steps 6 [--skip-sd15]        # ~5 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402
from trainer.events import Log, Progress  # noqa: E402
from trainer.loop.train import train  # noqa: E402
from trainer.models.loader import BaseModel, load_base_model, make_tokenizers  # noqa: E402

SIZES = [(640, 480), (480, 640), (512, 512), (800, 450), (450, 800), (600, 600), (720, 540), (500, 700)]


def write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"img{i}.jpg", quality=92)
        (folder / f"img{i}.txt").write_text(f"zkw, a photo number {i}, outdoors")
    return folder


def sd15_from_configs() -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = ROOT / "trainer" / "assets" / "configs" / "sd1"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(cfg / "scheduler"))
    for m in (unet, vae, te):
        m.requires_grad_(False)
    return BaseModel(arch="sd1", prediction_type="epsilon", unet=unet, vae=vae, text_encoders=[te],
                     tokenizers=make_tokenizers("sd1"), noise_scheduler=sched, name="sd15-size (random)",
                     source="configs", resolution=512)


def measure(make_base, data: Path, out: Path, resolution: int, steps: int, cached: bool) -> dict:
    events: list = []
    config = TrainConfig(data_dir=str(data), output_dir=str(out), resolution=resolution, rank=16, alpha=8.0,
                         max_train_steps=steps, batch_size=1, lr_scheduler="constant", seed=1,
                         cache_latents=cached, cache_text_encoder_outputs=cached, cache_to_disk=False,
                         effect_check=False)
    stamps: list[float] = []

    def listen(e):
        events.append(e)
        if isinstance(e, Progress):
            stamps.append(time.perf_counter())
        if isinstance(e, Log) and ("cache" in e.message):
            stamps.append(("log", time.perf_counter(), e.message))

    t0 = time.perf_counter()
    train(config, listeners=[listen], base=make_base())
    step_times = [b - a for a, b in zip([s for s in stamps if not isinstance(s, tuple)][:-1],
                                        [s for s in stamps if not isinstance(s, tuple)][1:])]
    return {"cached": cached, "median_step_s": statistics.median(step_times), "steps": steps,
            "total_s": time.perf_counter() - t0,
            "cache_logs": [s[2] for s in stamps if isinstance(s, tuple)],
            "peak_rss_gib_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = write_images(tmp / "photos")
    builtin = load_base_model("builtin")
    models = [("built-in", lambda: load_base_model("builtin"), builtin.resolution)]
    if not a.skip_sd15:
        models.append(("SD1.5-size", sd15_from_configs, 256))
    rows = []
    for label, make, res in models:
        for cached in (False, True):   # side by side, same process, same images
            r = measure(make, data, tmp / f"{label}-{cached}", res, a.steps, cached)
            r.update(model=label, resolution=res)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| model | px | caches | median step (s) | speed-up |\n|---|---|---|---|---|")
    for label, _, res in models:
        off, on = [r for r in rows if r["model"] == label]
        print(f"| {label} | {res} | off | {off['median_step_s']:.3f} | |")
        speedup = off["median_step_s"] / on["median_step_s"]
        print(f"| {label} | {res} | on | {on['median_step_s']:.3f} | {speedup:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
