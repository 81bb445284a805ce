"""Helpers the service tests share (the ``service`` fixture itself is in conftest.py)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def make_dataset(folder: Path, n: int = 30, size: int = 72, captions: bool = True) -> Path:
    """``n`` small PNGs (a coloured square with a white disc) and, optionally, same-stem captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        d = ImageDraw.Draw(img)
        x = 8 + (i * 7) % (size - 40)
        d.ellipse([x, x, x + 28, x + 28], fill=(255, 255, 255))
        img.save(folder / f"img_{i:02d}.png")
        if captions:
            (folder / f"img_{i:02d}.txt").write_text(f"a white disc on colour {i}\n", encoding="utf-8")
    return folder
