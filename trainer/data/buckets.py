"""Aspect-ratio buckets as pure functions: the bucket sizes for a resolution, the bucket an image goes to,
the resize-and-crop that fits it there, and the table the report shows (kohya's rules and metadata shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """How buckets are made: area <= resolution², sides multiples of ``step`` within [min_side, max_side]."""

    resolution: int
    step: int
    min_side: int
    max_side: int
    no_upscale: bool = False


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket and how it is resized (to cover the bucket) and cropped."""

    bucket: tuple[int, int]          # (width, height) of the training tensor
    resized: tuple[int, int]         # (width, height) after resizing, before the crop
    crop_left: int                   # top-left of the crop in the resized image
    crop_top: int
    original: tuple[int, int]        # (width, height) of the upright source image

    @property
    def aspect_error(self) -> float:
        """|image aspect - bucket aspect|, as kohya's ``mean_img_ar_error`` averages it."""
        return abs(self.original[0] / self.original[1] - self.bucket[0] / self.bucket[1])


def auto_step(resolution: int, multiple: int = 16) -> int:
    """64 px (kohya's default) from 256 px up; resolution/4 for small models; always a multiple of
    ``multiple`` (the model's pixel granularity, see ``pixel_multiple``)."""
    step = max(16, min(64, resolution // 4 // 16 * 16))
    return -(-step // multiple) * multiple


def pixel_multiple(vae_blocks: int, unet_down_blocks: int) -> int:
    """The side multiple a model can train on: the VAE's downscale times the UNet's."""
    return 2 ** (vae_blocks - 1) * 2 ** (unet_down_blocks - 1)


def bucket_spec(resolution: int, *, step: int = 0, min_side: int = 0, max_side: int = 0,
                no_upscale: bool = False, multiple: int = 16) -> BucketSpec:
    """Fill the automatic values: step from ``auto_step``, sides from half to twice the resolution."""
    step = step or auto_step(resolution, multiple)
    lo = min_side or max(step, resolution // 2 // step * step)
    hi = max_side or resolution * 2 // step * step
    return BucketSpec(resolution, step, lo, hi, no_upscale)


def bucket_sizes(spec: BucketSpec) -> list[tuple[int, int]]:
    """Every (width, height) with both sides multiples of ``step`` in [min_side, max_side], the largest
    height for each width whose area stays <= resolution², and the square; sorted by aspect ratio."""
    max_area = spec.resolution * spec.resolution
    sizes = {(spec.resolution // spec.step * spec.step,) * 2}
    width = spec.min_side
    while width <= spec.max_side:
        height = min(spec.max_side, max_area // width // spec.step * spec.step)
        if height >= spec.min_side:
            sizes.add((width, height))
            sizes.add((height, width))
        width += spec.step
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def place(width: int, height: int, spec: BucketSpec, sizes: list[tuple[int, int]] | None = None,
          *, center: bool = True) -> Placement:
    """The bucket nearest the image's aspect ratio, resized to cover it and cropped by the least amount.

    With ``no_upscale`` an image smaller than its bucket is not enlarged: it gets a bucket of its own,
    its sides rounded down to multiples of ``step`` (shrunk to the bucket area first when larger).
    ``center`` False returns the crop's range as (0, 0); the random offset is drawn by the caller."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    sizes = sizes if sizes is not None else bucket_sizes(spec)
    aspect = width / height
    bucket = min(sizes, key=lambda wh: (abs(math.log(wh[0] / wh[1] / aspect)), -wh[0] * wh[1]))
    if spec.no_upscale and (width < bucket[0] or height < bucket[1]):
        bucket = _own_bucket(width, height, spec)
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    left, top = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2) if center else (0, 0)
    return Placement(bucket, resized, left, top, (width, height))


def _own_bucket(width: int, height: int, spec: BucketSpec) -> tuple[int, int]:
    """A bucket inside the image (no enlarging): area capped at resolution², sides floored to ``step``."""
    max_area = spec.resolution * spec.resolution
    shrink = min(1.0, math.sqrt(max_area / (width * height)))
    w = max(spec.step, int(width * shrink) // spec.step * spec.step)
    h = max(spec.step, int(height * shrink) // spec.step * spec.step)
    return w, h


def bucket_table(placements: list[Placement], repeats: list[int] | None = None) -> dict:
    """kohya's ``ss_bucket_info`` shape: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...},
    "mean_img_ar_error": x}; counts include repeats when given. Buckets in aspect order."""
    repeats = repeats or [1] * len(placements)
    counts: dict[tuple[int, int], int] = {}
    for p, r in zip(placements, repeats):
        counts[p.bucket] = counts.get(p.bucket, 0) + r
    ordered = sorted(counts, key=lambda wh: (wh[0] / wh[1], wh[0]))
    error = sum(p.aspect_error for p in placements) / len(placements) if placements else 0.0
    return {"buckets": {str(i): {"resolution": list(wh), "count": counts[wh]} for i, wh in enumerate(ordered)},
            "mean_img_ar_error": error}


def add_bucket_table(report, spec: BucketSpec):
    """Fill a ``DatasetReport``'s ``buckets`` with where each image would train (counts include folder
    repeats); returns the report."""
    from .scan import small_warning   # scan imports nothing from here; kept local to stay one-way at import

    sizes = bucket_sizes(spec)
    sized = [i for i in report.items if i.width and i.height]
    placements = [place(i.width, i.height, spec, sizes) for i in sized]
    old = small_warning(report) if report.small else None
    report.buckets = bucket_table(placements, [i.repeats for i in sized])
    root = report.data_dir
    report.small = [i.path.relative_to(root).as_posix() if i.path.is_relative_to(root) else i.path.name
                    for i, p in zip(sized, placements) if p.resized[0] > i.width or p.resized[1] > i.height]
    warnings = [w for w in report.warnings if w != old]
    if report.small:
        warnings.append(small_warning(report))
    report.warnings = warnings
    return report


def sdxl_time_ids(p: Placement) -> tuple[int, int, int, int, int, int]:
    """SDXL micro-conditioning for one image: (original h, w, crop top, left, target h, w), as SDXL was
    trained: the source size, the crop's top-left in the resized image, and the bucket size."""
    return (p.original[1], p.original[0], p.crop_top, p.crop_left, p.bucket[1], p.bucket[0])
