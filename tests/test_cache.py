"""Latent and text-encoder caches, and bucketed training end to end on tiny models."""
from __future__ import annotations

import json
import os

import torch
from PIL import Image
from safetensors import safe_open

from tests.test_train import quick_config, tiny_base
from trainer.data.buckets import bucket_spec
from trainer.data.cache import LatentCache, TextCache, vae_identity
from trainer.data.dataset import LoraDataset
from trainer.data.scan import scan_dataset
from trainer.events import Finished, Log, Progress
from trainer.loop.train import train

SIZES = [(64, 64), (96, 48), (48, 96), (64, 64), (80, 64)]


def mixed_folder(folder, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), (40 * i, 120, 200 - 30 * i))
        img.paste((255, 255, 255), (4, 4, 20, 20))
        img.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a photo number {i}")
    return folder


def run(config, base=None):
    events = []
    path = train(config, listeners=[events.append], base=base or tiny_base())
    return path, events


def logs(events):
    return [e.message for e in events if isinstance(e, Log)]


# --- the latent cache ---------------------------------------------------------------------------
def test_latent_cache_reuses_files_and_recomputes_only_a_changed_image(tmp_path):
    data = mixed_folder(tmp_path / "photos")
    vae = tiny_base().vae
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return vae.encode(pixels).latent_dist.parameters

    def fill():
        ds = LoraDataset(scan_dataset(data, resolution=64), 64, buckets=bucket_spec(64, multiple=4),
                         random_flip=True)
        cache = LatentCache(vae_identity(vae, "tiny"), tmp_path / "cache")
        return ds, cache, cache.fill(ds, encode)

    ds, cache, first = fill()
    assert (first.computed, first.loaded, first.written) == (10, 0, 10)   # 5 images x (plain, flipped)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert len(files) == 10
    w, h = ds.placements[1].bucket
    assert cache.get(1, True).shape == (8, h // 2, w // 2)                 # mean + logvar, tiny VAE is /2
    calls.clear()
    _, _, second = fill()
    assert (second.computed, second.loaded, second.written) == (0, 10, 0) and calls == []
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == files  # nothing rewritten
    Image.new("RGB", (96, 48), (1, 2, 3)).save(data / "p1.png")                 # one image changes
    _, _, third = fill()
    assert (third.computed, third.loaded) == (2, 8)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert len(after) == 12 and all(after[name] == mtime for name, mtime in files.items())


def test_a_different_vae_never_reads_another_vaes_entries(tmp_path):
    data = mixed_folder(tmp_path / "photos", SIZES[:2])
    a, b = tiny_base().vae, tiny_base().vae
    with torch.no_grad():
        b.encoder.conv_in.weight.add_(0.1)
    assert vae_identity(a) != vae_identity(b)
    ds = LoraDataset(scan_dataset(data, resolution=64), 64)
    for vae in (a, b):
        stats = LatentCache(vae_identity(vae), tmp_path / "c").fill(ds, lambda x: vae.encode(x).latent_dist.parameters)
        assert stats.computed == 2


def test_text_cache_matches_encoding_each_time():
    from trainer.models.loader import encode_prompts

    base = tiny_base("sdxl")
    cache = TextCache(lambda captions: encode_prompts(base, captions, size=64))
    cache.warm(["a red circle", ""])
    captions = ["a red circle", "", "a red circle"]
    got, want = cache.encode(captions), encode_prompts(base, captions, size=64)
    assert len(cache) == 2
    torch.testing.assert_close(got["encoder_hidden_states"], want["encoder_hidden_states"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], want["added_cond_kwargs"]["text_embeds"],
                               atol=1e-5, rtol=1e-5)


# --- training with caches and buckets ----------------------------------------------------------
def first_loss(events):
    return next(e.loss for e in events if isinstance(e, Progress))


def test_cached_and_uncached_runs_give_the_same_first_loss(tmp_path):
    data = str(mixed_folder(tmp_path / "photos"))
    kw = dict(data_dir=data, max_train_steps=1, batch_size=2, caption_dropout=0.0)
    _, cached = run(quick_config(tmp_path, output_dir=str(tmp_path / "a"), **kw))
    _, plain = run(quick_config(tmp_path, output_dir=str(tmp_path / "b"), cache_latents=False,
                                cache_text_encoder_outputs=False, **kw))
    assert any("latent cache in" in line for line in logs(cached))
    assert any("text-encoder cache: 5 caption(s)" in line for line in logs(cached))
    assert not any(line.startswith(("latent cache", "text-encoder cache")) for line in logs(plain))
    assert abs(first_loss(cached) - first_loss(plain)) < 1e-5


def test_second_run_reuses_the_disk_cache(tmp_path):
    data = str(mixed_folder(tmp_path / "photos"))
    shared = str(tmp_path / "shared-cache")
    _, first = run(quick_config(tmp_path, data_dir=data, output_dir=str(tmp_path / "r1"), cache_dir=shared,
                                max_train_steps=1))
    _, second = run(quick_config(tmp_path, data_dir=data, output_dir=str(tmp_path / "r2"), cache_dir=shared,
                                 max_train_steps=1))
    assert any("5 encoded, 0 reused" in line for line in logs(first))
    assert any("0 encoded, 5 reused from disk, 0 file(s) written" in line for line in logs(second))
    assert not (tmp_path / "r2" / "cache").exists()


def test_random_crop_turns_the_latent_cache_off_with_a_reason(tmp_path):
    config = quick_config(tmp_path, center_crop=False, max_train_steps=1)
    _, events = run(config)
    assert any("latent cache off: random crops" in line for line in logs(events))
    assert not (tmp_path / "run" / "cache").exists()


def test_a_bucket_smaller_than_the_batch_still_trains(tmp_path):
    """Five images in three buckets with batch size 4 (64x64 holds 64x64 twice and 80x64; 96x48 -> 80x48;
    48x96 -> 48x80): 3 batches per epoch, the lone images in batches of one."""
    data = str(mixed_folder(tmp_path / "photos"))
    path, events = run(quick_config(tmp_path, data_dir=data, batch_size=4, max_train_steps=0, epochs=2))
    done = [e for e in events if isinstance(e, Finished)][0]
    assert done.steps == 2 * 3
    with safe_open(path, "pt") as f:
        md = f.metadata()
    info = json.loads(md["ss_bucket_info"])
    assert md["ss_enable_bucket"] == "True" and md["ss_bucket_no_upscale"] == "False"
    assert {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()} == {
        (64, 64): 3, (80, 48): 1, (48, 80): 1}
    assert md["ss_num_batches_per_epoch"] == "3"
    assert int(md["ss_min_bucket_reso"]) == 32 and int(md["ss_max_bucket_reso"]) == 128


def test_buckets_off_trains_square_and_says_so_in_the_metadata(tmp_path):
    data = str(mixed_folder(tmp_path / "photos"))
    path, events = run(quick_config(tmp_path, data_dir=data, enable_buckets=False, max_train_steps=1))
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["ss_enable_bucket"] == "False" and md["ss_bucket_info"] == "null"
    assert not any(line.startswith("buckets:") for line in logs(events))


def test_sdxl_layout_trains_in_buckets(tmp_path):
    data = str(mixed_folder(tmp_path / "photos"))
    path, events = run(quick_config(tmp_path, data_dir=data, max_train_steps=2), base=tiny_base("sdxl"))
    assert os.path.isfile(path) and any(line.startswith("buckets:") for line in logs(events))


# --- validation loss ---------------------------------------------------------------------------
def test_validation_loss_is_fixed_for_fixed_weights_and_logged(tmp_path):
    from trainer.events import Validation
    from trainer.loop.validation import build_validation_set, split_report, validation_loss

    data = str(mixed_folder(tmp_path / "photos"))
    config = quick_config(tmp_path, data_dir=data, validation_split=2, max_train_steps=3, validate_every_n_steps=2)
    report = scan_dataset(data, resolution=64)
    train_part, held = split_report(report, config)
    assert held.num_images == 2 and train_part.num_images == 3
    assert {i.path for i in held.items} == {i.path for i in split_report(report, config)[1].items}  # seeded
    base = tiny_base()
    vset = build_validation_set(held, config, base, torch.device("cpu"), None)
    first = validation_loss(vset, base, base.unet, config, torch.float32, torch.device("cpu"))
    assert first == validation_loss(vset, base, base.unet, config, torch.float32, torch.device("cpu"))
    _, events = run(config)
    vals = [e for e in events if isinstance(e, Validation)]
    assert [v.step for v in vals] == [0, 2, 3] and all(v.images == 2 for v in vals)
    assert vals[0].loss != vals[-1].loss                       # the weights changed between them
    from trainer.loop.records import read_events

    rows = read_events(tmp_path / "run")                          # the run's log of record
    assert [r["step"] for r in rows if r["type"] == "Validation"] == [0, 2, 3]
    assert [r["step"] for r in rows if r["type"] == "Progress"] == [1, 2, 3]


def test_validation_settings_that_cannot_work_are_clear_errors(tmp_path):
    import pytest

    from trainer.errors import TrainerError

    data = str(mixed_folder(tmp_path / "photos"))
    with pytest.raises(TrainerError, match=r"validation_split 5 holds out 5 of the 5 image\(s\) and leaves none"):
        run(quick_config(tmp_path, data_dir=data, validation_split=5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainerError) as err:
        run(quick_config(tmp_path, data_dir=data, validation_dir=str(tmp_path / "empty")))
    assert err.value.field == "validation_dir" and "validation_dir: " in str(err.value)
    assert "empty" in str(err.value) and "no images" in str(err.value)
    errors = quick_config(tmp_path, validation_split=2.5, validation_dir="x").validate()
    assert "whole count" in errors["validation_split"] and "use one" in errors["validation_dir"]


# --- regularisation images ----------------------------------------------------------------------
def test_regularisation_images_balance_the_epoch_and_are_counted(tmp_path):
    from trainer.data.pipeline import scan_regularisation

    data = str(mixed_folder(tmp_path / "photos"))                       # 5 training images
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 200, 10 * i)).save(reg_dir / f"r{i}.png")
        (reg_dir / f"r{i}.txt").write_text("a photo")
    config = quick_config(tmp_path, data_dir=data, reg_data_dir=str(reg_dir), prior_loss_weight=0.5, repeats=2,
                          max_train_steps=0, epochs=1, batch_size=1)
    reg = scan_regularisation(config)
    ds = LoraDataset(scan_dataset(data, resolution=64), 64, repeats=2, reg=reg, prior_loss_weight=0.5)
    assert len(ds) == 20                                                 # 10 training + 10 regularisation
    reg_samples = [ds[i] for i in range(len(ds)) if ds.item_of(i) >= 5]
    assert len(reg_samples) == 10 and {s["loss_weight"] for s in reg_samples} == {0.5}
    assert sorted(ds.item_of(i) for i in range(10, 20)) == [5] * 5 + [6] * 5   # 2 images repeated to 10
    path, events = run(config)
    assert any("regularisation: 2 image(s), 10 sample(s)" in line for line in logs(events))
    assert [e for e in events if isinstance(e, Finished)][0].steps == 20
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_reg_images_count"] == "2"


def test_an_empty_regularisation_folder_is_a_clear_error(tmp_path):
    import pytest

    from trainer.errors import TrainerError

    (tmp_path / "reg").mkdir()
    with pytest.raises(TrainerError) as err:
        run(quick_config(tmp_path, reg_data_dir=str(tmp_path / "reg")))
    assert err.value.field == "reg_data_dir" and "reg_data_dir: " in str(err.value)
