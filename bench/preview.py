"""Measurement: the preview renderer. Strength change (no reload), a render with an adapter unfused and fused
(merged into the weights for the render, base weights restored after) against the base model alone, and
switching between adapters against reloading the base model. Built-in model at its native 64 px; optionally the
SD1.5-size model (random weights, bench/reference.py) at 256 px.

    python bench/preview.py [--sd15] [--renders 5] [--steps 20]          # ~2 min (built-in), +10 min SD1.5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.reference import save_sd15, write_images  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.loop.train import train  # noqa: E402
from trainer.models.loader import load_base_model  # noqa: E402
from trainer.render.generate import RenderSettings, Renderer  # noqa: E402


def timed(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def adapters(model: str, data: Path, out: Path, res: int) -> list[str]:
    """Two small adapters (rank 16 on the cross-attention, a few steps each) to preview."""
    return [str(train(TrainConfig(model=model, data_dir=str(data), output_dir=str(out / f"a{seed}"), resolution=res,
                                  max_train_steps=2, learning_rate=1e-3, seed=seed, rank=16, alpha=16,
                                  enable_buckets=False, checkpoint_every_n_steps=0,
                                  effect_check=False))) for seed in (1, 2)]


def measure(label: str, model: str, res: int, a: argparse.Namespace, tmp: Path) -> dict:
    files = adapters(model, write_images(tmp / "photos"), tmp / label, min(res, 128))
    t0 = time.perf_counter()
    renderer = Renderer.load(model, device="cpu")
    load_s = time.perf_counter() - t0
    s = RenderSettings(prompt="zkw, a photo number 1, outdoors", steps=a.steps, seed=1, size=res)
    renderer.render(s)                                            # warm-up
    base_s = timed(lambda: renderer.render(s), a.renders)
    renderer.fuse = False
    unfused_s = timed(lambda: renderer.render(s, {files[0]: 0.8}), a.renders)
    renderer.fuse = True
    fused_s = timed(lambda: renderer.render(s, {files[0]: 0.8}), a.renders)
    weights = iter([0.1 * (i % 15) for i in range(1000)])
    strength_ms = 1000 * timed(lambda: renderer.set_strengths({files[0]: next(weights)}), 50)
    t0 = time.perf_counter()
    renderer.set_strengths({files[1]: 1.0})                       # a second file: attached, base not reloaded
    attach_s = time.perf_counter() - t0
    toggle = iter(range(1000))
    switch_ms = 1000 * timed(lambda: renderer.set_strengths({files[next(toggle) % 2]: 1.0}), 20)
    row = {"model": label, "px": res, "steps": a.steps, "load_base_s": load_s, "render_base_s": base_s,
           "render_unfused_s": unfused_s, "render_fused_s": fused_s, "fused_over_base": fused_s / base_s,
           "unfused_over_base": unfused_s / base_s, "strength_change_ms": strength_ms,
           "attach_new_adapter_s": attach_s, "switch_adapter_ms": switch_ms}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--renders", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="folder for the SD1.5-size model and the adapters (default: a temp dir)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(a.work or tempfile.mkdtemp(prefix="bench-preview-"))
    rows = [measure("built-in", "builtin", load_base_model("builtin").resolution, a, tmp)]
    if a.sd15:
        rows.append(measure("SD1.5-size", str(save_sd15(tmp / "sd15-random")), 256, a, tmp))
    print("\n| model | px | base render (s) | unfused | fused | fused / base | strength change (ms) | "
          "switch adapter (ms) | attach new (s) | reload base (s) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['px']} | {r['render_base_s']:.3f} | {r['render_unfused_s']:.3f} | "
              f"{r['render_fused_s']:.3f} | {r['fused_over_base']:.3f} | {r['strength_change_ms']:.2f} | "
              f"{r['switch_adapter_ms']:.2f} | {r['attach_new_adapter_s']:.2f} | {r['load_base_s']:.2f} |")


if __name__ == "__main__":
    main()
