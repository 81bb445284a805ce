"""Aspect-ratio buckets: the pure maths, the bucketed dataset and sampler, SDXL size conditioning."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from trainer.config import TrainConfig
from trainer.data.buckets import (BucketSpec, add_bucket_table, bucket_sizes, bucket_spec, bucket_table, place,
                                  sdxl_time_ids)
from trainer.data.dataset import BucketBatchSampler, LoraDataset, collate
from trainer.data.pipeline import buckets_for
from trainer.data.scan import scan_dataset
from trainer.errors import TrainerError


# --- pure functions ---------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [64, 256, 512, 1024])
def test_bucket_sizes_respect_area_step_and_sides(resolution):
    spec = bucket_spec(resolution, multiple=16)
    sizes = bucket_sizes(spec)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w * h <= resolution * resolution
        assert w % spec.step == 0 and h % spec.step == 0
        assert spec.min_side <= w <= spec.max_side and spec.min_side <= h <= spec.max_side
        assert (h, w) in sizes                                   # portrait and landscape alike
    assert spec.min_side == resolution // 2 and spec.max_side == 2 * resolution


def test_sd15_buckets_are_kohyas():
    spec = bucket_spec(512, multiple=64)
    assert spec.step == 64
    assert {(576, 448), (448, 576), (640, 384), (768, 320), (512, 512)} <= set(bucket_sizes(spec))


def test_place_picks_nearest_aspect_and_crops_least():
    spec = bucket_spec(512, multiple=64)
    p = place(1024, 768, spec)                                   # 4:3 photo
    assert p.bucket == (576, 448)
    assert p.resized == (597, 448)                               # covers the bucket: 768 * 448/768 = 448 high
    assert (p.crop_left, p.crop_top) == ((597 - 576) // 2, 0)
    ar = 1024 / 768
    assert all(abs(math.log(p.bucket[0] / p.bucket[1] / ar)) <= abs(math.log(w / h / ar)) + 1e-12
               for w, h in bucket_sizes(spec))
    tall = place(600, 1200, spec)
    assert tall.bucket == (320, 704) and tall.resized == (352, 704)  # 1:2 is wider than 320:704: crop the width
    for q in (p, tall):                                          # covers the bucket, one side exactly
        assert q.resized[0] >= q.bucket[0] and q.resized[1] >= q.bucket[1] and (
            q.resized[0] == q.bucket[0] or q.resized[1] == q.bucket[1])


def test_no_upscale_keeps_small_images_small():
    spec = bucket_spec(512, multiple=64, no_upscale=True)
    p = place(300, 200, spec)
    assert p.bucket == (256, 192) and p.resized[0] <= 300 and p.resized[1] <= 200   # never enlarged
    big = place(2000, 1000, spec)
    assert big.bucket[0] * big.bucket[1] <= 512 * 512 and big.resized[0] >= big.bucket[0]
    assert place(300, 200, bucket_spec(512, multiple=64)).resized[0] > 300   # default: enlarged to a bucket


def test_bucket_table_counts_and_aspect_error():
    spec = bucket_spec(64, multiple=16)
    ps = [place(64, 64, spec), place(64, 64, spec), place(100, 60, spec)]
    table = bucket_table(ps, [1, 2, 1])
    counts = {tuple(b["resolution"]): b["count"] for b in table["buckets"].values()}
    assert counts == {(64, 64): 3, ps[2].bucket: 1}
    assert table["mean_img_ar_error"] == pytest.approx(ps[2].aspect_error / 3)


def test_sdxl_time_ids_for_a_cropped_non_square_image():
    """1024x768 photo at 1024 px: bucket 1152x896 (nearest 4:3 of kohya's list), resized to cover it."""
    spec = bucket_spec(1024, multiple=64)
    p = place(1024, 768, spec)
    assert p.bucket == (1152, 896)
    # cover: scale = max(1152/1024, 896/768) = 1.1667 -> 1195 x 896; centre crop: (1195 - 1152) // 2 = 21
    assert p.resized == (1195, 896) and (p.crop_left, p.crop_top) == (21, 0)
    assert sdxl_time_ids(p) == (768, 1024, 0, 21, 896, 1152)   # (orig h, w, crop top, left, target h, w)


def test_bucket_settings_are_validated():
    errors = TrainConfig(bucket_step=12, min_bucket_reso=300, max_bucket_reso=200).validate()
    assert "multiple of 8" in errors["bucket_step"] and "max_bucket_reso" in errors["min_bucket_reso"]
    with pytest.raises(TrainerError, match=r"bucket_step 48 is not a multiple of 64.*use 64"):
        buckets_for(TrainConfig(resolution=512, bucket_step=48), multiple=64)
    assert buckets_for(TrainConfig(resolution=512, enable_buckets=False)) is None


# --- the dataset --------------------------------------------------------------------------------
SIZES = [(64, 64), (128, 40), (40, 128), (96, 56), (56, 96), (64, 64), (70, 66)]


def mixed(folder):
    for i, (w, h) in enumerate(SIZES):
        img = Image.new("RGB", (w, h), (30 * i, 100, 200))
        img.paste((255, 255, 255), (0, 0, 8, 8))                  # a marker at the top-left corner
        img.save(folder / f"m{i}.png")
        (folder / f"m{i}.txt").write_text(f"image {i}")
    return scan_dataset(folder, resolution=64)


def test_mixed_aspect_dataset_trains_in_several_buckets(tmp_path):
    report = mixed(tmp_path)
    spec = bucket_spec(64, multiple=16)
    ds = LoraDataset(report, 64, buckets=spec)
    shapes = {ds.placements[i].bucket for i in range(len(ds.items))}
    assert len(shapes) >= 3
    for i in range(len(ds)):
        w, h = ds.bucket_of(i)
        sample = ds[i]
        assert sample["pixel_values"].shape == (3, h, w)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=0)
    seen = []
    for batch_indices in sampler:
        batch = collate([ds[i] for i in batch_indices])      # stacking fails if a batch mixed buckets
        assert batch["pixel_values"].shape[0] == len(batch_indices) <= 2
        seen += batch_indices
    assert sorted(seen) == list(range(len(ds)))                 # every sample once, singletons included
    assert len(sampler) == sum(math.ceil(len(g) / 2) for g in sampler.groups.values())


def test_sampler_order_is_seeded_per_epoch(tmp_path):
    ds = LoraDataset(mixed(tmp_path), 64, buckets=bucket_spec(64, multiple=16), repeats=3)
    a, b = BucketBatchSampler(ds, 2, seed=1), BucketBatchSampler(ds, 2, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(sum(list(a), [])) == sorted(sum(first, []))


def test_square_mode_matches_the_resolution(tmp_path):
    ds = LoraDataset(mixed(tmp_path), 32)                        # no buckets: every image 32x32
    assert {tuple(ds[i]["pixel_values"].shape) for i in range(len(ds))} == {(3, 32, 32)}


def test_flip_moves_the_crop_origin_in_time_ids(tmp_path):
    Image.new("RGB", (96, 48), (10, 10, 10)).save(tmp_path / "wide.png")
    report = scan_dataset(tmp_path, resolution=32)
    spec = BucketSpec(32, 16, 16, 64)
    ds = LoraDataset(report, 32, buckets=spec, random_flip=True, repeats=40)
    p = ds.placements[0]
    ids = {ds[i]["flip"]: ds[i]["time_ids"].tolist() for i in range(len(ds))}
    assert set(ids) == {False, True}
    left = p.crop_left
    assert ids[False][3] == left and ids[True][3] == p.resized[0] - left - p.bucket[0]
    assert ids[False][:3] == [48, 96, p.crop_top] and ids[False][4:] == [p.bucket[1], p.bucket[0]]


def test_report_shows_the_bucket_table(tmp_path):
    report = add_bucket_table(mixed(tmp_path), bucket_spec(64, multiple=16))
    assert len(report.buckets["buckets"]) >= 3
    text = report.summary()
    assert "Buckets: " in text and "64x64 (3)" in text and "mean aspect error" in text
    assert report.to_dict()["buckets"] == report.buckets


def test_time_ids_reach_the_unet(tmp_path, monkeypatch):
    """The loop replaces encode_prompts' square time ids by each image's own (SDXL)."""
    from tests.test_train import tiny_base
    from trainer.loop import train as loop

    base = tiny_base("sdxl")
    seen = []
    forward = base.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(base.unet, "forward", spy)
    ds = LoraDataset(mixed(tmp_path), 64, buckets=bucket_spec(64, multiple=4))
    batch = collate([ds[1]])
    config = TrainConfig(resolution=64, min_snr_gamma=0.0)
    loop.diffusion_loss(base, base.unet, batch, config, base.noise_scheduler, base.noise_scheduler.alphas_cumprod,
                        None, torch.float32, torch.device("cpu"))
    assert torch.equal(seen[0], batch["time_ids"])
    assert seen[0][0, :2].tolist() == [40.0, 128.0]             # image 1 is 128 wide, 40 high


def test_size_warning_follows_the_buckets(tmp_path):
    """96x56 is 'smaller than 64 px on the short side' but trains in an 80x48 bucket without enlarging."""
    report = mixed(tmp_path)
    assert any("smaller than 64 px on the short side" in w for w in report.warnings)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(tmp_path / "tiny.png")      # smaller than any bucket
    report = add_bucket_table(scan_dataset(tmp_path, resolution=64), bucket_spec(64, multiple=16))
    assert report.small == ["tiny.png"]
    assert not any("on the short side" in w for w in report.warnings)
    assert any(w.startswith("1 image(s) are smaller than the bucket they train in") and "tiny.png (30x30)" in w
               for w in report.warnings)
