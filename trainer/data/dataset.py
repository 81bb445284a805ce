"""The torch Dataset the loop reads: a scanned report served as seeded, cached square image tensors and
captions, and the collate function that batches them.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainerError
from .images import IMAGE_EXTENSIONS, crop_square, load_image, resize_short_side, to_uint8_tensor, to_unit_range
from .scan import DatasetReport

__all__ = ["LoraDataset", "collate"]


class LoraDataset(torch.utils.data.Dataset):
    """Square training tensors and captions from a ``DatasetReport``.

    Length is ``report.num_samples * repeats``. Each sample draws its caption dropout, random crop
    and flip from its own RNG seeded by (seed, epoch, index), so two runs with the same seed see
    identical data. The epoch is the one given to ``set_epoch``; until that is called it is the
    number of times this index was read before, which is right for in-process loading
    (``num_workers=0``). Decoded, resized images are kept in memory (uint8, up to
    ``cache_bytes``), so only the first epoch decodes files.
    """

    def __init__(self, report: DatasetReport, resolution: int, *, center_crop: bool = True,
                 random_flip: bool = False, repeats: int = 1, caption_dropout: float = 0.0, seed: int = 0,
                 cache_bytes: int = 2 << 30):
        if report.unreadable:
            n = len(report.unreadable)
            images_only = all(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f, _ in report.unreadable)
            kind = "image" if images_only else "file"
            listed = "; ".join(f"{f} ({why})" for f, why in report.unreadable[:10])
            more = f"; and {n - 10} more" if n > 10 else ""
            raise TrainerError(f"{n} {kind}{'s' if n != 1 else ''} in '{report.data_dir}' cannot be read: "
                               f"{listed}{more}; re-save or remove them.", field="data_dir")
        if not report.items:
            raise TrainerError(f"Dataset '{report.data_dir}' has no images to train on; add some.",
                               field="data_dir")
        if resolution < 8:
            raise TrainerError(f"Resolution {resolution} is too small; use 512 (SD1.5) or 1024 (SDXL).",
                               field="resolution")
        if repeats < 1:
            raise TrainerError(f"Repeats {repeats} must be 1 or more.", field="repeats")
        if not 0 <= caption_dropout < 1:
            raise TrainerError(f"Caption dropout {caption_dropout} must be in [0, 1); 0.05-0.1 is typical.",
                               field="caption_dropout")
        self.items = list(report.items)
        self.resolution = resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.repeats, self.caption_dropout, self.seed = repeats, caption_dropout, seed
        self.cache_bytes = cache_bytes
        self._order = [i for i, item in enumerate(self.items) for _ in range(item.repeats)]
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self._epoch: int | None = None
        self._reads = [0] * len(self)

    def __len__(self) -> int:
        return len(self._order) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` in every sample's seed (call at the start of each epoch, and on resume)."""
        self._epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        epoch = self._epoch if self._epoch is not None else self._reads[index]
        self._reads[index] += 1
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds hash stably (sha512)
        item_index = self._order[index % len(self._order)]
        drop = rng.random() < self.caption_dropout  # always drawn, so crops do not depend on dropout
        pixels = self._pixels(item_index)
        if not self.center_crop:
            pixels = crop_square(pixels, self.resolution, center=False, rng=rng)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": to_unit_range(pixels),
                "caption": "" if drop else self.items[item_index].caption}

    def _pixels(self, item_index: int) -> torch.Tensor:
        """uint8 [3, H, W]: centre-cropped to the resolution, or the resized full image for random crops."""
        cached = self._cache.get(item_index)
        if cached is not None:
            return cached
        img = load_image(self.items[item_index].path, min_size=2 * self.resolution)
        pixels = to_uint8_tensor(resize_short_side(img, self.resolution))
        if self.center_crop:
            pixels = crop_square(pixels, self.resolution, center=True)
        pixels = pixels.clone(memory_format=torch.contiguous_format)  # compact; frees the uncropped image
        if self._cached_bytes + pixels.numel() <= self.cache_bytes:
            self._cache[item_index] = pixels
            self._cached_bytes += pixels.numel()
        return pixels


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> {"pixel_values": Tensor[B, 3, R, R], "captions": list[str]}."""
    return {"pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
            "captions": [sample["caption"] for sample in batch]}
