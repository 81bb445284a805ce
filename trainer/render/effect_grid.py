"""The effect check's picture: a grid with one row per strength and one column per seed (a block of columns per
prompt), each row labelled with its strength and mean score, each cell with its own score (Pillow only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 128                # cells are drawn at this size (small renders enlarged without smoothing)
LABEL_W, HEADER_H, GAP = 92, 34, 8


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:     # Pillow without FreeType sizes
        return ImageFont.load_default()


def grid_size(strengths: int, seeds: int, prompts: int) -> tuple[int, int]:
    """(width, height) of the grid image."""
    return (LABEL_W + prompts * seeds * CELL + (prompts - 1) * GAP, HEADER_H + strengths * CELL)


def write_grid(path: str | Path, images: list[list[list]], scores: np.ndarray, strengths: Sequence[float],
               seeds: Sequence[int], prompts: Sequence[str]) -> Path:
    """``images[strength][prompt][seed]``; ``scores`` the same shape. Returns the PNG's path."""
    width, height = grid_size(len(strengths), len(seeds), len(prompts))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(14), _font(11)
    for p, prompt in enumerate(prompts):
        x0 = LABEL_W + p * (len(seeds) * CELL + GAP)
        text = prompt if len(prompt) <= 34 * len(seeds) // 2 else prompt[:34 * len(seeds) // 2 - 1] + "…"
        draw.text((x0 + 2, 2), text or "(empty prompt)", fill=(30, 30, 30), font=small)
        for k, seed in enumerate(seeds):
            draw.text((x0 + k * CELL + 2, 18), f"seed {seed}", fill=(110, 110, 110), font=small)
    for r, strength in enumerate(strengths):
        y0 = HEADER_H + r * CELL
        draw.text((6, y0 + CELL // 2 - 18), f"strength {strength:g}", fill=(30, 30, 30), font=big)
        draw.text((6, y0 + CELL // 2 + 2), f"score {scores[r].mean():.2f}", fill=(60, 60, 160), font=big)
        for p in range(len(prompts)):
            x0 = LABEL_W + p * (len(seeds) * CELL + GAP)
            for k in range(len(seeds)):
                cell = images[r][p][k].convert("RGB")
                resample = Image.NEAREST if cell.width < CELL else Image.LANCZOS
                canvas.paste(cell.resize((CELL, CELL), resample), (x0 + k * CELL, y0))
                label = f"{scores[r, p, k]:.2f}"
                box = draw.textbbox((0, 0), label, font=small)
                lx, ly = x0 + k * CELL + CELL - (box[2] - box[0]) - 5, y0 + CELL - (box[3] - box[1]) - 6
                draw.rectangle((lx - 2, ly - 1, lx + box[2] - box[0] + 2, ly + box[3] - box[1] + 3), fill=(0, 0, 0))
                draw.text((lx, ly - box[1]), label, fill=(255, 255, 255), font=small)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out
