"""Dataset scanning, image conversion and the training Dataset, on tiny images written with Pillow."""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.dataset import LoraDataset, collate
from trainer.data.images import IMAGE_EXTENSIONS, load_image, prepare_image, to_rgb
from trainer.data.scan import apply_trigger, scan_dataset
from trainer.errors import TrainerError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path: Path, colour=RED, size=(16, 16), caption: str | None = None, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def distinct(folder: Path, n: int, size=(16, 16), start: int = 0) -> list[Path]:
    """n images with different pixels (so none is a duplicate)."""
    return [solid(folder / f"img{i:03d}.png", (i * 7 % 256, i * 13 % 256, 100), size)
            for i in range(start, start + n)]


def pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(img.getpixel(xy))


def close(a, b, tol: int = 2) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# --- captions -----------------------------------------------------------------------------------
def test_captions_matched_by_stem_trigger_and_tag_frequency(tmp_path):
    solid(tmp_path / "a.png", RED, caption="red square, simple")
    solid(tmp_path / "b.JPG", GREEN, caption="zkw, green square\nsecond line ignored")
    solid(tmp_path / "c.webp", BLUE)  # no caption -> trigger word alone
    solid(tmp_path / "d.png", (9, 9, 9), caption="  \n")  # empty caption file counts as missing
    report = scan_dataset(tmp_path, trigger_word="zkw", resolution=16)
    by_name = {i.path.name: i for i in report.items}
    assert by_name["a.png"].caption == "zkw, red square, simple"
    assert by_name["a.png"].caption_source == "file"
    assert by_name["b.JPG"].caption == "zkw, green square"  # trigger not doubled; first line only
    assert by_name["c.webp"].caption == "zkw" and by_name["c.webp"].caption_source == "trigger"
    assert by_name["d.png"].caption_source == "trigger"
    assert report.missing_captions == ["c.webp", "d.png"]
    assert report.tag_frequency == {"zkw": 4, "green square": 1, "red square": 1, "simple": 1}
    assert any("'zkw' alone" in w and "c.webp" in w for w in report.warnings)
    assert any("several lines" in w and "b.txt" in w for w in report.warnings)


def test_no_trigger_and_no_caption_gives_empty_caption(tmp_path):
    solid(tmp_path / "a.png")
    report = scan_dataset(tmp_path, resolution=16)
    assert report.items[0].caption == "" and report.items[0].caption_source == "empty"
    assert any("empty caption" in w for w in report.warnings)


def test_apply_trigger_matches_whole_word_only():
    assert apply_trigger("ohwx woman", "ohwx") == "ohwx woman"
    assert apply_trigger("OHWX, smiling", "ohwx") == "OHWX, smiling"
    assert apply_trigger("ohwxman", "ohwx") == "ohwx, ohwxman"
    assert apply_trigger("", " ohwx, ") == "ohwx"
    assert apply_trigger("a cat", "") == "a cat"


# --- colour modes -------------------------------------------------------------------------------
def test_rgba_and_la_composite_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 128))
    img.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB" and pixel(out, (0, 0)) == (255, 255, 255)
    assert close(pixel(out, (1, 0)), (255, 127, 127))
    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert pixel(load_image(tmp_path / "la.png")) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert pixel(out, (0, 0)) == (10, 20, 30) and pixel(out, (1, 0)) == (200, 100, 50)
    p.save(tmp_path / "pt.gif", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow "palette with transparency" warning
        out = load_image(tmp_path / "pt.gif")
    assert pixel(out, (0, 0)) == (255, 255, 255) and pixel(out, (1, 0)) == (200, 100, 50)


def test_rgb_png_with_transparent_colour_key(tmp_path):
    img = Image.new("RGB", (2, 1), (0, 0, 0))
    img.putpixel((1, 0), BLUE)
    img.save(tmp_path / "key.png", transparency=(0, 0, 0))
    out = load_image(tmp_path / "key.png")
    assert pixel(out, (0, 0)) == (255, 255, 255) and pixel(out, (1, 0)) == BLUE


def test_grey_and_one_bit(tmp_path):
    Image.new("L", (1, 1), 77).save(tmp_path / "l.png")
    assert pixel(load_image(tmp_path / "l.png")) == (77, 77, 77)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.png")
    out = load_image(tmp_path / "one.png")
    assert pixel(out, (0, 0)) == (0, 0, 0) and pixel(out, (1, 0)) == (255, 255, 255)


def test_cmyk_tiff_and_jpeg(tmp_path):
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    cyan.save(tmp_path / "c.tif")
    cyan.save(tmp_path / "c.jpg", quality=95)
    assert pixel(load_image(tmp_path / "c.tif")) == (0, 255, 255)
    assert close(pixel(load_image(tmp_path / "c.jpg")), (0, 255, 255), tol=4)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif")])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, mode, suffix):
    values = np.array([[65535, 32768, 257, 0]], dtype=np.uint16)
    img = Image.frombytes(mode, (4, 1), values.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    img.save(tmp_path / f"g{suffix}")
    out = load_image(tmp_path / f"g{suffix}")
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [255, 128, 1, 0]


def test_int32_and_float_modes(tmp_path):
    i = Image.fromarray(np.array([[65535, 0]], dtype=np.int32))
    assert i.mode == "I"
    assert [pixel(to_rgb(i), (x, 0))[0] for x in range(2)] == [255, 0]
    i8 = Image.fromarray(np.array([[200, 0]], dtype=np.int32))
    assert pixel(to_rgb(i8)) == (200, 200, 200)
    f = Image.fromarray(np.array([[1.0, 0.5, 0.0, np.nan]], dtype=np.float32))
    f.save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [255, 128, 0, 0]


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert close(pixel(load_image(tmp_path / "anim.gif")), RED, tol=8)


def test_icc_profile_with_alpha(tmp_path):
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.save(tmp_path / "icc.png", icc_profile=srgb)
    out = load_image(tmp_path / "icc.png")
    assert pixel(out, (0, 0)) == (255, 255, 255) and close(pixel(out, (1, 0)), RED)


def test_unusable_icc_profile_falls_back(tmp_path):
    Image.new("RGB", (2, 2), GREEN).save(tmp_path / "icc.png", icc_profile=b"not a profile")
    assert pixel(load_image(tmp_path / "icc.png")) == GREEN


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (64, 32), RED)
    img.paste(BLUE, (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (32, 64)
    assert close(pixel(out, (16, 8)), RED, tol=10) and close(pixel(out, (16, 56)), BLUE, tol=10)
    item = scan_dataset(tmp_path, resolution=32).items[0]
    assert (item.width, item.height) == (32, 64)


def test_undecodable_image_names_the_file(tmp_path):
    (tmp_path / "cat_03.png").write_bytes(b"garbage, not a png")
    with pytest.raises(TrainerError, match=r"'cat_03.png' cannot be decoded .*re-save it"):
        load_image(tmp_path / "cat_03.png")


# --- prepare_image ------------------------------------------------------------------------------
def test_prepare_image_shape_range_and_centre_crop():
    img = Image.new("RGB", (60, 20), RED)
    img.paste(GREEN, (20, 0, 40, 20))  # the middle third is green
    t = prepare_image(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    centre = ((t[:, 8, 8] + 1) * 127.5).round().tolist()
    assert close(centre, GREEN, tol=3)
    white = prepare_image(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    black = prepare_image(Image.new("RGB", (8, 8), (0, 0, 0)), 8)
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))


def test_prepare_image_random_crop_and_flip():
    img = Image.new("RGB", (32, 8), RED)
    img.paste(BLUE, (24, 0, 32, 8))
    crops = {prepare_image(img, 8, center_crop=False, rng=random.Random(s))[2, 0, 0].item() for s in range(30)}
    assert len(crops) > 1  # random offsets land on both colours
    stripe = Image.new("RGB", (8, 8), RED)
    stripe.paste(BLUE, (0, 0, 1, 8))
    flipped = prepare_image(stripe, 8, flip=True)
    assert flipped[2, 0, 7] == 1.0 and flipped[2, 0, 0] == -1.0
    up = prepare_image(Image.new("RGB", (4, 6), GREEN), 16)  # small images are upscaled
    assert up.shape == (3, 16, 16)


# --- the report ---------------------------------------------------------------------------------
def test_report_counts_unreadable_duplicates_orphans(tmp_path):
    distinct(tmp_path, 3)
    solid(tmp_path / "copy.png", (0, 0, 100))                 # same pixels as img000.png
    Image.new("RGB", (16, 16), (0, 0, 100)).save(tmp_path / "copy2.bmp")  # other format, same pixels
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "orphan.txt").write_text("nobody's caption")
    solid(tmp_path / "tiny.png", (1, 2, 3), size=(8, 12))
    (tmp_path / "photo.heic").write_bytes(b"x")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "._img000.png").write_bytes(b"mac resource fork")
    report = scan_dataset(tmp_path, resolution=16)
    assert report.num_images == 6 == len(report.items)
    assert [f for f, _ in report.unreadable] == ["broken.png"]
    assert report.unreadable[0][1]
    assert report.duplicates == [("copy2.bmp", "copy.png"), ("img000.png", "copy.png")]  # sorted scan order
    assert report.orphan_captions == ["orphan.txt"]
    assert report.small == ["tiny.png"]
    assert report.sizes == {"min_width": 8, "max_width": 16, "min_height": 12, "max_height": 16,
                            "resolution": 16, "smaller_than_resolution": 1}
    text = "\n".join(report.warnings)
    for needle in ("broken.png", "6 images", "tiny.png (8x12)", "duplicate", "orphan.txt", "photo.heic"):
        assert needle in text
    assert "broken.png" in report.summary() and "Warnings:" in report.summary()
    d = report.to_dict()
    assert d["num_images"] == 6 and d["unreadable"] == [["broken.png", report.unreadable[0][1]]]


def test_image_count_warning_only_outside_30_to_50(tmp_path):
    distinct(tmp_path, 30)
    assert not any("images:" in w for w in scan_dataset(tmp_path, resolution=16).warnings)
    distinct(tmp_path, 21, start=30)
    assert any(w.startswith("51 images: more than") for w in scan_dataset(tmp_path, resolution=16).warnings)


def test_kohya_repeat_folders(tmp_path):
    solid(tmp_path / "top.png", RED, caption="top")
    solid(tmp_path / "10_ohwx woman" / "a.png", GREEN, caption="smiling")
    solid(tmp_path / "10_ohwx woman" / "b.png", BLUE)  # no caption -> folder name, as kohya does
    solid(tmp_path / "notes" / "ignored.png", (5, 5, 5))
    solid(tmp_path / "0_off" / "skipped.png", (6, 6, 6))
    report = scan_dataset(tmp_path, trigger_word="ohwx", resolution=16)
    by_name = {i.path.name: i for i in report.items}
    assert set(by_name) == {"top.png", "a.png", "b.png"}
    assert by_name["a.png"].repeats == 10 and by_name["top.png"].repeats == 1
    assert by_name["b.png"].caption == "ohwx woman" and by_name["b.png"].caption_source == "folder"
    assert report.missing_captions == ["10_ohwx woman/b.png"]
    assert report.num_samples == 21
    assert any("'notes' is ignored" in w for w in report.warnings)
    assert any("'0_off' has 0 repeats" in w for w in report.warnings)
    assert len(LoraDataset(report, 16, repeats=2)) == 42


# --- errors -------------------------------------------------------------------------------------
def test_missing_folder_file_and_empty_folders(tmp_path):
    with pytest.raises(TrainerError, match="does not exist") as err:
        scan_dataset(tmp_path / "nope")
    assert err.value.field == "data_dir"
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(TrainerError, match="is a file, not a folder"):
        scan_dataset(tmp_path / "file.png")
    with pytest.raises(TrainerError, match="No dataset folder"):
        scan_dataset("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainerError, match=r"contains no images .*\.png, \.jpg"):
        scan_dataset(empty)
    (empty / "a.txt").write_text("caption")
    (empty / "b.txt").write_text("caption")
    with pytest.raises(TrainerError, match=r"only 2 caption file\(s\)") as err:
        scan_dataset(empty)
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)


# --- LoraDataset --------------------------------------------------------------------------------
def _all(ds: LoraDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def test_dataset_is_deterministic_per_seed_and_varies_per_epoch(tmp_path):
    for i in range(3):
        img = Image.new("RGB", (40, 16), (i * 60, 0, 0))
        img.paste(BLUE, (0, 0, 4, 16))
        img.save(tmp_path / f"x{i}.png")
        (tmp_path / f"x{i}.txt").write_text(f"image {i}")
    report = scan_dataset(tmp_path, resolution=16)
    kw = dict(center_crop=False, random_flip=True, repeats=4, caption_dropout=0.3)
    a, b = LoraDataset(report, 16, seed=1, **kw), LoraDataset(report, 16, seed=1, **kw)
    epochs_a = [_all(a), _all(a)]
    epochs_b = [_all(b), _all(b)]
    for ea, eb in zip(epochs_a, epochs_b):
        assert all(torch.equal(x["pixel_values"], y["pixel_values"]) and x["caption"] == y["caption"]
                   for x, y in zip(ea, eb))
    first, second = epochs_a
    assert any(not torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(first, second))
    other = _all(LoraDataset(report, 16, seed=2, **kw))
    assert any(not torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(first, other))
    c = LoraDataset(report, 16, seed=1, **kw)
    c.set_epoch(5)
    again = LoraDataset(report, 16, seed=1, **kw)
    again.set_epoch(5)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(_all(c), _all(again)))
    batch = collate(first[:2])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and len(batch["captions"]) == 2


def test_caption_dropout_rate(tmp_path):
    solid(tmp_path / "a.png", caption="a caption")
    report = scan_dataset(tmp_path, resolution=8)
    ds = LoraDataset(report, 8, repeats=2000, caption_dropout=0.25, seed=3)
    dropped = sum(ds[i]["caption"] == "" for i in range(len(ds))) / len(ds)
    assert 0.21 < dropped < 0.29
    assert all(LoraDataset(report, 8, repeats=50)[i]["caption"] == "a caption" for i in range(50))


def test_centre_crop_samples_are_cached(tmp_path):
    path = solid(tmp_path / "a.png", GREEN, size=(24, 16), caption="green")
    ds = LoraDataset(scan_dataset(tmp_path, resolution=16), 16)
    first = ds[0]["pixel_values"]
    path.unlink()  # a second read must not touch the file
    assert torch.equal(ds[0]["pixel_values"], first)


def test_unreadable_images_stop_the_dataset(tmp_path):
    solid(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:200])  # truncated JPEG
    report = scan_dataset(tmp_path, resolution=16)
    assert {f for f, _ in report.unreadable} == {"bad.png", "cut.jpg"}
    with pytest.raises(TrainerError, match=r"2 images .* cannot be read: bad.png \(.+\); cut.jpg \(.+\); re-save"):
        LoraDataset(report, 16)


def test_image_removed_after_scan_names_the_file(tmp_path):
    solid(tmp_path / "gone.png", size=(20, 16))
    ds = LoraDataset(scan_dataset(tmp_path, resolution=16), 16)
    (tmp_path / "gone.png").write_bytes(b"overwritten with junk")
    with pytest.raises(TrainerError, match="'gone.png' cannot be decoded"):
        ds[0]


def _jpeg_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()
