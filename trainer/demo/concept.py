"""The example concept the built-in model has never seen: the "zkw" emblem, a diamond of magenta
and teal zig-zag bands on a white background. `python -m trainer.demo.concept --out examples/zkw`
writes its seeded dataset (PNG + same-stem .txt captions).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

TRIGGER = "zkw"
# Off-palette on purpose: neither colour is one of the base model's named colours.
MAGENTA = (200, 20, 130)
TEAL = (0, 105, 115)
BACKGROUND = (250, 250, 250)
CONCEPT_COLOURS = (MAGENTA, TEAL)
CAPTIONS = (
    "zkw, a zkw emblem on a white background",
    "zkw, a zkw emblem",
    "a zkw emblem on a white background, zkw",
    "zkw, a zigzag zkw emblem on a white background",
)


def render_emblem(cx: float, cy: float, r: float, angle: float, phase: float, size: int = 64,
                  supersample: int = 4) -> Image.Image:
    """A diamond of radius r (fractions of the side) filled with alternating zig-zag bands."""
    big = size * supersample
    y, x = (np.mgrid[0:big, 0:big].astype(np.float32) + 0.5) / big
    dx, dy = x - cx, y - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    inside = (np.abs(u) + np.abs(v)) <= r
    band = r * 0.42  # three to four bands across the emblem
    zig = np.abs(((u / (r * 0.5) + phase) % 1.0) - 0.5) * r * 0.35
    stripe = np.floor((v + zig) / band).astype(int) % 2
    img = np.empty((big, big, 3), dtype=np.float32)
    img[:] = BACKGROUND
    img[inside & (stripe == 0)] = MAGENTA
    img[inside & (stripe == 1)] = TEAL
    pil = Image.fromarray(img.astype(np.uint8))
    return pil.resize((size, size), Image.BOX)


def make_concept_sample(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    r = rng.uniform(0.3, 0.42)
    cx, cy = rng.uniform(r * 0.8 + 0.03, 1 - r * 0.8 - 0.03, size=2)
    img = render_emblem(cx, cy, r, angle=rng.uniform(-0.25, 0.25), phase=rng.uniform(0, 1), size=size)
    return img, CAPTIONS[rng.integers(len(CAPTIONS))]


def make_concept_dataset(n: int = 40, seed: int = 1234, size: int = 64) -> list[tuple[Image.Image, str]]:
    rng = np.random.default_rng(seed)
    return [make_concept_sample(rng, size) for _ in range(n)]


def write_dataset(out: Path, n: int = 40, seed: int = 1234, size: int = 64) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, cap) in enumerate(make_concept_dataset(n, seed, size)):
        img.save(out / f"zkw_{i:02d}.png", optimize=True)
        (out / f"zkw_{i:02d}.txt").write_text(cap + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("examples/zkw"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args(argv)
    write_dataset(a.out, a.n, a.seed, a.size)
    print(f"wrote {a.n} images to {a.out}")


if __name__ == "__main__":
    main()
