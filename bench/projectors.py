"""Measurement: the example concept (examples/zkw) on the built-in model, trained with LoRA on (a) the UNet
cross-attention only, (b) the projector layers only, (c) both, at about equal trainable-parameter counts and
equal steps (the `quick` preset otherwise). Reports trainable parameters, time, final loss and the concept
score (share of pixels in the concept's colours) at strengths 0 / 0.5 / 1.0. Results: docs/PROJECTORS.md.

    python bench/projectors.py --out outputs/bench-projectors           # 5-15 min on 1 CPU thread
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer.config import resolve  # noqa: E402
from trainer.demo.concept import BACKGROUND, CONCEPT_COLOURS, TRIGGER  # noqa: E402
from trainer.demo.score import colour_share  # noqa: E402
from trainer.events import Finished, Progress, Started  # noqa: E402
from trainer.render.generate import RenderSettings, Renderer  # noqa: E402
from trainer.loop.train import train  # noqa: E402

PROMPT = f"{TRIGGER}, a {TRIGGER} emblem on a white background"
STRENGTHS = (0.0, 0.5, 1.0)
# The built-in UNet has 7 transformer blocks whose cross-attention q/k/v/out are 64x64 (3,584 LoRA parameters
# per unit of rank) and one projector, encoder_hid_proj 64x64 (128 per unit of rank). Equal counts: 7,168 each.
# alpha = rank everywhere (scale 1, as the quick preset), learning rate 1e-3 for every group.
VARIANTS = {
    "a_cross_attention": dict(rank=2, alpha=2.0),
    "b_projectors": dict(train_unet=False, train_projector=True, projector_rank=56, projector_alpha=56.0,
                         projector_lr=1e-3),
    "c_both": dict(rank=1, alpha=1.0, train_projector=True, projector_rank=28, projector_alpha=28.0,
                   projector_lr=1e-3),
    # reference, not parameter-matched: the quick preset as shipped (cross-attention rank 8)
    "ref_quick_rank8": dict(),
}


def run_variant(name: str, overrides: dict, args: argparse.Namespace) -> dict:
    config = resolve("quick", {"model": args.model, "data_dir": str(ROOT / "examples" / "zkw"),
                               "trigger_word": TRIGGER, "output_dir": str(Path(args.out) / name), "name": name,
                               "max_train_steps": args.steps, "seed": args.seed, **overrides})
    seen: dict = {}

    def listen(event) -> None:
        if isinstance(event, Started):
            seen["params"] = event.trainable_params
        elif isinstance(event, Progress):
            seen["avg_loss"] = event.avg_loss
        elif isinstance(event, Finished):
            seen["final_loss"], seen["seconds"] = event.final_loss, event.seconds

    t0 = time.perf_counter()
    path = train(config, listeners=[listen])
    return {"variant": name, "path": str(path), "trainable_params": seen["params"],
            "train_seconds": round(seen["seconds"], 1), "wall_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": seen["final_loss"], "avg_loss_last50": seen["avg_loss"], "overrides": overrides}


def score(renderer: Renderer, path: str, seeds: range, grid: Path) -> dict[str, float]:
    """Concept score per strength; also writes ``grid`` (rows: strengths, columns: seeds)."""
    from PIL import Image
    out, rows = {}, []
    for weight in STRENGTHS:
        images = [renderer.render(RenderSettings(PROMPT, seed=s, steps=20, guidance=5.0), {path: weight})
                  for s in seeds]
        out[f"{weight:g}"] = colour_share(images, CONCEPT_COLOURS)
        rows.append(images)
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * len(seeds), h * len(rows)), "white")
    for i, images in enumerate(rows):
        for j, im in enumerate(images):
            sheet.paste(im, (j * w, i * h))
    sheet.save(grid)
    return out


def scores_from_grid(grid: Path, size: int = 64) -> dict[str, dict[str, float]]:
    """Re-read a variant's grid: the concept score and the white-background share (the concept's white
    ground, which the base model never draws for this prompt) per strength."""
    from PIL import Image
    sheet = Image.open(grid).convert("RGB")
    out: dict[str, dict[str, float]] = {"score": {}, "white": {}}
    for i, weight in enumerate(STRENGTHS):
        images = [sheet.crop((j * size, i * size, (j + 1) * size, (i + 1) * size))
                  for j in range(sheet.width // size)]
        out["score"][f"{weight:g}"] = colour_share(images, CONCEPT_COLOURS)
        out["white"][f"{weight:g}"] = colour_share(images, [BACKGROUND])
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | trainable params | train time (s) | final loss | mean loss, last 50 | concept score "
             "@0 / 0.5 / 1.0 | white share @0 / 0.5 / 1.0 |", "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        s, w = r["score"], r.get("white", {})
        white = " / ".join(f"{w[k]:.2f}" for k in ("0", "0.5", "1")) if w else "–"
        lines.append(f"| {r['variant']} | {r['trainable_params']:,} | {r['train_seconds']:.0f} | "
                     f"{r['final_loss']:.4f} | {r['avg_loss_last50']:.4f} | "
                     f"{s['0']:.3f} / {s['0.5']:.3f} / {s['1']:.3f} | {white} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench-projectors")
    parser.add_argument("--model", default="builtin", help="base model (default: the built-in demo model)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=6, help="render seeds 0..N-1 per strength")
    parser.add_argument("--seed", type=int, default=42, help="training seed (the quick preset's default: 42)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                        + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rescore", action="store_true", help="only re-read --out's results.json and grids")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rescore:
        rows = json.loads((Path(args.out) / "results.json").read_text())
        for row in rows:
            row.update(scores_from_grid(Path(args.out) / f"{row['variant']}.png"))
        print(table(rows))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results_path = Path(args.out) / "results.json"
    rows = []
    renderer = None
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        row = run_variant(name, VARIANTS[name], args)
        renderer = renderer or Renderer.load(args.model)
        grid = Path(args.out) / f"{name}.png"
        row["score"] = score(renderer, row["path"], range(args.seeds), grid)
        row["white"] = scores_from_grid(grid)["white"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        results_path.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    assert all(math.isfinite(r["final_loss"]) for r in rows)


if __name__ == "__main__":
    main()
