"""Concept scores for generated images (pure numpy/PIL): named-colour shares, dominant colour,
colour-histogram distance between image sets, and foreground-mask overlap. Used by tests and docs
to tell whether a prompt or a LoRA had a visible effect.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from trainer.demo.shapes import COLOURS

Palette = dict[str, tuple[int, int, int]]


def as_array(image) -> np.ndarray:
    """PIL image or HxWx3 array (uint8, or float in [0, 1]) -> float32 HxWx3 in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    a = np.asarray(image)
    if a.dtype != np.uint8 and a.max() <= 1.0 + 1e-6:
        a = a * 255.0
    return a.astype(np.float32)[..., :3]


def colour_fractions(image, palette: Palette | None = None, max_distance: float = 90.0) -> dict[str, float]:
    """Share of pixels whose nearest palette colour is each name (pixels farther than
    `max_distance` in RGB from every palette colour count for none)."""
    palette = palette or COLOURS
    px = as_array(image).reshape(-1, 3)
    ref = np.array(list(palette.values()), dtype=np.float32)
    d = np.linalg.norm(px[:, None, :] - ref[None], axis=-1)
    nearest = d.argmin(1)
    ok = d[np.arange(len(px)), nearest] <= max_distance
    counts = np.bincount(nearest[ok], minlength=len(ref)) / len(px)
    return {name: float(c) for name, c in zip(palette, counts)}


def dominant_colour(image, palette: Palette | None = None, exclude: Iterable[str] = ()) -> str:
    """The named colour covering most pixels, ignoring the names in `exclude` (e.g. the background)."""
    fr = colour_fractions(image, palette)
    skip = set(exclude)
    return max((n for n in fr if n not in skip), key=lambda n: fr[n])


_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")


def parse_caption(caption: str) -> tuple[str, str, str]:
    """"a red circle on a blue background" -> ("red", "circle", "blue")."""
    m = _CAPTION.search(caption)
    if not m:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> on a <colour> background'")
    return m.group(1), m.group(2), m.group(3)


def colours_match(image, caption: str, min_fg: float = 0.03) -> bool:
    """True when the background colour covers most pixels and the shape colour is the next most
    common named colour, covering at least `min_fg` of the image."""
    fg, _, bg = parse_caption(caption)
    fr = colour_fractions(image)
    return dominant_colour(image) == bg and dominant_colour(image, exclude=[bg]) == fg and fr[fg] >= min_fg


def prompt_colour_accuracy(images: Sequence, captions: Sequence[str]) -> float:
    """Share of images whose foreground and background colours match their captions."""
    return float(np.mean([colours_match(im, c) for im, c in zip(images, captions)]))


def colour_histogram(images: Sequence, bins: int = 8) -> np.ndarray:
    """Mean joint RGB histogram (bins**3 cells, sums to 1) over a set of images."""
    h = np.zeros(bins ** 3)
    for im in images:
        q = np.clip(as_array(im) * bins / 256.0, 0, bins - 1).astype(int).reshape(-1, 3)
        h += np.bincount(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2], minlength=bins ** 3) / len(q)
    return h / max(1, len(images))


def colour_histogram_distance(images: Sequence, reference_images: Sequence, bins: int = 8) -> float:
    """Total-variation distance (0 = same colours, 1 = disjoint) between two sets' mean histograms."""
    return float(0.5 * np.abs(colour_histogram(images, bins) - colour_histogram(reference_images, bins)).sum())


def colour_share(images: Sequence, colours: Iterable[tuple[int, int, int]], max_distance: float = 60.0) -> float:
    """Mean share of pixels within `max_distance` (RGB) of any of `colours`, e.g. a concept's colours."""
    ref = np.array(list(colours), dtype=np.float32)
    shares = []
    for im in images:
        px = as_array(im).reshape(-1, 3)
        d = np.linalg.norm(px[:, None, :] - ref[None], axis=-1).min(1)
        shares.append(float((d <= max_distance).mean()))
    return float(np.mean(shares))


def foreground_mask(image, background: tuple[int, int, int] | None = None, threshold: float = 60.0) -> np.ndarray:
    """Pixels farther than `threshold` from the background colour (default: the median border colour)."""
    a = as_array(image)
    if background is None:
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        background = tuple(np.median(border, axis=0))
    return np.linalg.norm(a - np.array(background, dtype=np.float32), axis=-1) > threshold


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def shape_mask_distance(images: Sequence, reference_images: Sequence) -> float:
    """1 - IoU of the two sets' mean foreground masks thresholded at 0.5 (layout, not position-exact)."""
    m1 = np.mean([foreground_mask(im) for im in images], axis=0) > 0.5
    m2 = np.mean([foreground_mask(im) for im in reference_images], axis=0) > 0.5
    return 1.0 - mask_iou(m1, m2)
