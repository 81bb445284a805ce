"""Train the README quickstart LoRA (quick preset on examples/zkw) and show its effect on the built-in model.

Writes a grid (rows: adapter strength, columns: seeds) and prints the concept colour share per strength.
Usage: python scripts/demo_lora_grid.py --out docs/img/zkw_strengths.png [--adapter FILE] [--set FIELD=VALUE ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageDraw

from trainer.config import resolve
from trainer.demo.concept import CONCEPT_COLOURS, TRIGGER
from trainer.demo.score import colour_histogram_distance, colour_share
from trainer.render.generate import RenderSettings, Renderer
from trainer.loop.train import train

ROOT = Path(__file__).resolve().parent.parent
PROMPT = f"{TRIGGER}, a {TRIGGER} emblem on a white background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--adapter", help="use this adapter instead of training one")
    ap.add_argument("--run", default="outputs/zkw-quick")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--strengths", default="0,0.25,0.5,0.75,1.0")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    a = ap.parse_args()
    adapter = a.adapter
    if not adapter:
        overrides = dict(s.split("=", 1) for s in a.set)
        config = resolve("quick", {"data_dir": str(ROOT / "examples" / TRIGGER), "trigger_word": TRIGGER,
                                   "output_dir": a.run, **overrides})
        t = time.perf_counter()
        adapter = str(train(config))
        print(f"trained in {time.perf_counter() - t:.0f}s -> {adapter}")
    renderer = Renderer.load("builtin")
    dataset = [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples" / TRIGGER).glob("*.png"))]
    strengths = [float(s) for s in a.strengths.split(",")]
    cell, pad = 96, 4
    grid = Image.new("RGB", (60 + a.seeds * (cell + pad), len(strengths) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for row, w in enumerate(strengths):
        images = [renderer.render(RenderSettings(PROMPT, seed=s, steps=20, guidance=5.0), {adapter: w})
                  for s in range(a.seeds)]
        print(f"strength {w:4.2f}: histogram distance to the dataset "
              f"{colour_histogram_distance(images, dataset):.3f}, "
              f"concept colour share {colour_share(images, CONCEPT_COLOURS):.3f}")
        draw.text((4, row * (cell + pad) + cell // 2 - 6), f"w={w:g}", fill="black")
        for col, img in enumerate(images):
            grid.paste(img.resize((cell, cell), Image.NEAREST), (60 + col * (cell + pad), row * (cell + pad)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
