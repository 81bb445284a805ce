"""The torch Dataset the loop reads: a scanned report served as seeded samples (image tensor or cached VAE
latents, caption, SDXL size conditioning) placed in aspect-ratio buckets, the batch sampler that keeps
each batch inside one bucket, and the collate function.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import TrainerError
from .buckets import BucketSpec, Placement, bucket_sizes, place, sdxl_time_ids
from .images import IMAGE_EXTENSIONS, load_image, resize_to, to_uint8_tensor, to_unit_range
from .scan import DatasetReport

if TYPE_CHECKING:
    from .cache import LatentCache

__all__ = ["LoraDataset", "BucketBatchSampler", "collate"]

CaptionFn = Callable[[str, random.Random], str]   # (caption, the sample's rng) -> the caption trained on


class LoraDataset(torch.utils.data.Dataset):
    """Training samples from a ``DatasetReport``.

    Length is ``report.num_samples * repeats``, twice that with ``reg`` (regularisation images fill as many
    samples again, weighted ``prior_loss_weight``, as sd-scripts balances them). Each image has a
    placement: a bucket (``buckets``; without it one square bucket of ``resolution``), the size it is
    resized to so it covers the bucket, and the crop. Each sample draws, in this order, its caption
    dropout, random crop (``center_crop`` False), flip and caption transform from its own RNG seeded by
    (seed, epoch, index), so two runs with the same seed see identical data. The epoch is the one given to
    ``set_epoch``; until that is called it is the number of times this index was read before (right for
    in-process loading, ``num_workers=0``). Resized images are kept in memory (uint8, up to
    ``cache_bytes``), so only the first epoch decodes files; with ``use_latents`` a sample carries the
    VAE's cached latent moments instead of pixels.
    """

    def __init__(self, report: DatasetReport, resolution: int, *, center_crop: bool = True,
                 random_flip: bool = False, repeats: int = 1, caption_dropout: float = 0.0, seed: int = 0,
                 cache_bytes: int = 2 << 30, buckets: BucketSpec | None = None,
                 caption_fn: CaptionFn | None = None, reg: DatasetReport | None = None,
                 prior_loss_weight: float = 1.0):
        _check_inputs(report, resolution, repeats, caption_dropout)
        self.items = list(report.items) + (list(reg.items) if reg else [])
        self.num_train_items = len(report.items)
        self.prior_loss_weight = prior_loss_weight
        self.resolution = resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.repeats, self.caption_dropout, self.seed = repeats, caption_dropout, seed
        self.cache_bytes = cache_bytes
        self.caption_fn = caption_fn
        self.buckets = buckets
        sizes = bucket_sizes(buckets) if buckets else [(resolution, resolution)]
        spec = buckets or BucketSpec(resolution, 8, resolution, resolution)
        self.placements = [place(item.width or resolution, item.height or resolution, spec, sizes)
                           for item in self.items]
        train_order = [i for i, item in enumerate(report.items) for _ in range(item.repeats)] * repeats
        # sd-scripts' rule: regularisation images, repeated or cut, as many per epoch as training samples
        reg_items = range(self.num_train_items, len(self.items))
        reg_order = [reg_items[k % len(reg_items)] for k in range(len(train_order))] if reg_items else []
        self._order = train_order + reg_order
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self._epoch: int | None = None
        self._reads = [0] * len(self)
        self.latents: LatentCache | None = None

    def __len__(self) -> int:
        return len(self._order)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` in every sample's seed (call at the start of each epoch, and on resume)."""
        self._epoch = epoch

    def use_latents(self, cache: "LatentCache") -> None:
        """Serve the cache's latent moments instead of pixels (it must hold every image and flip)."""
        self.latents = cache

    def item_of(self, index: int) -> int:
        """The image (index into ``items``) that sample ``index`` shows."""
        return self._order[index]

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.placements[self.item_of(index)].bucket

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        epoch = self._epoch if self._epoch is not None else self._reads[index]
        self._reads[index] += 1
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds hash stably (sha512)
        item_index = self.item_of(index)
        p = self.placements[item_index]
        drop = rng.random() < self.caption_dropout  # always drawn, so crops do not depend on dropout
        left, top = p.crop_left, p.crop_top
        if self.latents is None:
            pixels = self.pixels(item_index)
            if not self.center_crop:
                left, top = rng.randint(0, p.resized[0] - p.bucket[0]), rng.randint(0, p.resized[1] - p.bucket[1])
                pixels = pixels[:, top:top + p.bucket[1], left:left + p.bucket[0]]
        flip = self.random_flip and rng.random() < 0.5
        caption = "" if drop else self.items[item_index].caption
        if self.caption_fn is not None and caption:
            caption = self.caption_fn(caption, rng)
        if flip:  # the crop's top-left as seen in the mirrored resized image
            left = p.resized[0] - left - p.bucket[0]
        weight = self.prior_loss_weight if item_index >= self.num_train_items else 1.0
        sample = {"caption": caption, "item": item_index, "flip": flip, "loss_weight": weight,
                  "index": index, "epoch": epoch,
                  "time_ids": torch.tensor(sdxl_time_ids(_moved(p, left, top)), dtype=torch.float32)}
        if self.latents is not None:
            sample["latent_params"] = self.latents.get(item_index, flip)
        else:
            sample["pixel_values"] = to_unit_range(pixels.flip(-1) if flip else pixels)
        return sample

    def pixels(self, item_index: int) -> torch.Tensor:
        """uint8 [3, H, W]: cropped to the bucket (centre crops), or the resized image for random crops."""
        cached = self._cache.get(item_index)
        if cached is not None:
            return cached
        p = self.placements[item_index]
        img = load_image(self.items[item_index].path, min_size=2 * min(p.resized))
        pixels = to_uint8_tensor(resize_to(img, p.resized))
        if self.center_crop:
            pixels = pixels[:, p.crop_top:p.crop_top + p.bucket[1], p.crop_left:p.crop_left + p.bucket[0]]
        pixels = pixels.clone(memory_format=torch.contiguous_format)  # compact; frees the uncropped image
        if self._cached_bytes + pixels.numel() <= self.cache_bytes:
            self._cache[item_index] = pixels
            self._cached_bytes += pixels.numel()
        return pixels


def _moved(p: Placement, left: int, top: int) -> Placement:
    return Placement(p.bucket, p.resized, left, top, p.original)


def _check_inputs(report: DatasetReport, resolution: int, repeats: int, caption_dropout: float) -> None:
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


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of sample indices that share a bucket. Each epoch (``set_epoch``) shuffles the samples within
    each bucket and the order of the batches, seeded; a bucket with fewer samples than ``batch_size`` gives
    one smaller batch, so no image is ever dropped."""

    def __init__(self, dataset: LoraDataset, batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self._skip = 0
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index in range(len(dataset)):
            self.groups.setdefault(dataset.bucket_of(index), []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, batches: int) -> None:
        """The next pass starts after its first ``batches`` batches (a resumed epoch); later passes are whole."""
        self._skip = batches

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())

    def __iter__(self):
        rng = random.Random(f"{self.seed}:batches:{self.epoch}")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            rng.shuffle(indices)
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        skip, self._skip = self._skip, 0
        return iter(batches[skip:])


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one bucket -> {"pixel_values": [B, 3, H, W] or "latent_params": [B, 2C, h, w],
    "captions": list[str], "time_ids": [B, 6], "items": list[int], "flips": list[bool]}."""
    out: dict[str, Any] = {"captions": [s["caption"] for s in batch],
                           "time_ids": torch.stack([s["time_ids"] for s in batch]),
                           "items": [s["item"] for s in batch], "flips": [s["flip"] for s in batch],
                           "indices": [s["index"] for s in batch], "epoch": batch[0]["epoch"],
                           "loss_weights": torch.tensor([s["loss_weight"] for s in batch], dtype=torch.float32)}
    key = "latent_params" if "latent_params" in batch[0] else "pixel_values"
    out[key] = torch.stack([s[key] for s in batch])
    return out
