"""The data side of one run, built from its config: the bucketed dataset, its batch sampler and each
process's share of every batch, and the latent and text-encoder caches when they are valid (each decision
logged with its reason).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TrainConfig
from ..errors import TrainerError
from .buckets import BucketSpec, bucket_spec, bucket_table, pixel_multiple
from .cache import ENCODE_BATCH, LatentCache, TextCache, vae_identity
from .captions import check_keep_tokens, transform_caption
from .dataset import BucketBatchSampler, LoraDataset, collate
from .scan import DatasetReport, scan_dataset


@dataclass
class DataPipe:
    """The sampler makes global batches (``batch_size`` x processes, one bucket each); this process trains on
    its slice of each, so N processes x batch b see exactly what one process x batch N*b sees."""

    dataset: LoraDataset
    sampler: BucketBatchSampler
    batch_size: int                        # per process
    text_cache: TextCache | None           # None: captions are encoded every step
    buckets: BucketSpec | None
    num_reg_images: int = 0
    rank: int = 0
    world: int = 1

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's batch order and samples."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def batches(self):
        """(this process's batch, or None when its slice is empty; the global batch's size) per global batch."""
        b = self.batch_size
        for global_batch in self.sampler:
            local = global_batch[self.rank * b:(self.rank + 1) * b]
            yield (collate([self.dataset[i] for i in local]) if local else None), len(global_batch)

    def metadata(self) -> dict[str, str]:
        """kohya's bucket keys for the exported file."""
        import json

        table = bucket_table(self.dataset.placements, [item.repeats for item in self.dataset.items])
        spec = self.buckets
        return {"ss_enable_bucket": str(spec is not None),
                "ss_bucket_info": json.dumps(table) if spec else "null",
                "ss_min_bucket_reso": str(spec.min_side) if spec else "None",
                "ss_max_bucket_reso": str(spec.max_side) if spec else "None",
                "ss_bucket_no_upscale": str(bool(spec and spec.no_upscale)),
                "ss_num_batches_per_epoch": str(len(self.sampler)),
                "ss_reg_images_count": str(self.num_reg_images)}


def buckets_for(config: TrainConfig, multiple: int = 16) -> BucketSpec | None:
    """The config's bucket settings (None when buckets are off); needs a resolved ``resolution``.
    ``multiple``: the model's pixel granularity; an explicit ``bucket_step`` must be a multiple of it."""
    if not config.enable_buckets:
        return None
    if config.bucket_step and config.bucket_step % multiple:
        raise TrainerError(f"bucket_step {config.bucket_step} is not a multiple of {multiple}, the smallest size "
                           f"step this model's VAE and UNet accept; use {-(-config.bucket_step // multiple) * multiple}"
                           " or 0 (automatic).", field="bucket_step")
    return bucket_spec(config.resolution, step=config.bucket_step, min_side=config.min_bucket_reso,
                       max_side=config.max_bucket_reso, no_upscale=config.bucket_no_upscale, multiple=multiple)


def model_multiple(unet: torch.nn.Module, vae: torch.nn.Module) -> int:
    """``pixel_multiple`` of a diffusers UNet and VAE."""
    return pixel_multiple(len(vae.config.block_out_channels), len(unet.config.down_block_types))


def caption_fn_for(config: TrainConfig) -> Callable | None:
    """The per-sample caption transform (tag shuffle / tag dropout), or None when captions are fixed."""
    if not (config.shuffle_tags or config.tag_dropout):
        return None
    return functools.partial(transform_caption, shuffle_tags=config.shuffle_tags, keep_tokens=config.keep_tokens,
                             tag_dropout=config.tag_dropout)


def scan_regularisation(config: TrainConfig) -> DatasetReport | None:
    """The regularisation folder's report (its own captions, no trigger word), or None when unset."""
    if not config.reg_data_dir.strip():
        return None
    try:
        reg = scan_dataset(config.reg_data_dir, resolution=config.resolution or 512,
                           caption_extension=config.caption_extension)
    except TrainerError as err:
        raise TrainerError(f"reg_data_dir: {err}", field="reg_data_dir") from None
    if reg.unreadable:
        names = ", ".join(f for f, _ in reg.unreadable[:5])
        raise TrainerError(f"reg_data_dir '{config.reg_data_dir}' has unreadable images ({names}); re-save or "
                           "remove them.", field="reg_data_dir")
    return reg


def build_data(config: TrainConfig, report: DatasetReport, *, log: Callable[[str], None],
               multiple: int = 16, reg: DatasetReport | None = None, rank: int = 0, world: int = 1) -> DataPipe:
    spec = buckets_for(config, multiple)
    check_keep_tokens({str(i.path.name): i.caption for i in report.items}, config.keep_tokens,
                      shuffle_tags=config.shuffle_tags, tag_dropout=config.tag_dropout)
    dataset = LoraDataset(report, config.resolution, center_crop=config.center_crop,
                          random_flip=config.random_flip, repeats=config.repeats,
                          caption_dropout=config.caption_dropout, seed=config.seed, buckets=spec,
                          caption_fn=caption_fn_for(config), reg=reg,
                          prior_loss_weight=config.prior_loss_weight)
    if reg is not None:
        log(f"regularisation: {reg.num_images} image(s), {len(dataset) // 2} sample(s) per epoch beside as many "
            f"training samples, loss weight {config.prior_loss_weight:g}")
    sampler = BucketBatchSampler(dataset, config.batch_size * world, seed=config.seed)
    if spec is not None:
        table = bucket_table(dataset.placements, [item.repeats for item in dataset.items])
        log("buckets: " + describe_buckets(table))
    return DataPipe(dataset, sampler, config.batch_size, None, spec, reg.num_images if reg else 0, rank, world)


def describe_buckets(table: dict) -> str:
    """'64x64 (30), 48x80 (6); mean aspect error 0.021' from a ``bucket_table``."""
    cells = [f"{b['resolution'][0]}x{b['resolution'][1]} ({b['count']})" for b in table["buckets"].values()]
    return ", ".join(cells) + f"; mean aspect error {table['mean_img_ar_error']:.3f}"


def attach_latent_cache(pipe: DataPipe, config: TrainConfig, vae: torch.nn.Module, *, device, base_name: str,
                        run_dir: Path, log: Callable[[str], None], barrier: Callable[[], None] = lambda: None
                        ) -> bool:
    """Encode (or reuse) every image's latents and serve them from the cache; False when the cache is off
    or not valid for this config (said in the log)."""
    if not config.cache_latents:
        return False
    if not config.center_crop:
        log("latent cache off: random crops (center_crop = false) change every epoch; every step encodes "
            "through the VAE")
        return False
    folder = (Path(config.cache_dir).expanduser() if config.cache_dir else run_dir / "cache") / "latents"
    cache = LatentCache(vae_identity(vae, base_name), folder if config.cache_to_disk else None)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(device, dtype=vae.dtype)).latent_dist.parameters

    batch = 1 if torch.device(device).type == "cpu" else ENCODE_BATCH   # see ENCODE_BATCH
    if pipe.world > 1 and cache.folder is not None:   # each process encodes its share, then all read the lot
        cache.fill(pipe.dataset, encode, share=(pipe.rank, pipe.world), batch=batch)
        barrier()
    stats = cache.fill(pipe.dataset, encode, batch=batch)
    log(stats.line(cache.folder))
    pipe.dataset.use_latents(cache)
    return True


def attach_text_cache(pipe: DataPipe, config: TrainConfig, encode: Callable[[list[str]], Any],
                      *, log: Callable[[str], None]) -> bool:
    """Cache the text encoders' outputs per caption when nothing changes them between steps."""
    if not config.cache_text_encoder_outputs:
        return False
    if config.train_text_encoder:
        return False   # the encoder changes every step: nothing to cache (no log: the expected case)
    if config.shuffle_tags or config.tag_dropout:
        log("text-encoder cache off: shuffle_tags / tag_dropout change the captions every epoch")
        return False
    captions = [item.caption for item in pipe.dataset.items]
    if config.caption_dropout:
        captions.append("")
    pipe.text_cache = TextCache(encode)
    pipe.text_cache.warm(captions)
    log(f"text-encoder cache: {len(pipe.text_cache)} caption(s) encoded once")
    return True
