"""Hypothesis feeds random and mutated bytes to the four readers of user files: the image loader, the caption
reader (a dataset scan), the LoRA importer and the config loader (config.json / preset files / values). Nothing
may escape but the project's own error type; each property runs FUZZ_EXAMPLES (>= 300) examples."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as save_safetensors

from trainer.errors import TrainerError

EXAMPLES = max(300, int(os.environ.get("FUZZ_EXAMPLES", "300")))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-"))


def scratch(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path


def _image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, fmt)
    return buf.getvalue()


SEEDS = {"png": _image("PNG"), "jpg": _image("JPEG"), "gif": _image("GIF", "P"), "webp": _image("WEBP"),
         "bmp": _image("BMP"), "tif": _image("TIFF", "I;16")}


@st.composite
def mutated(draw, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """(extension, bytes): a valid seed file with some bytes flipped, cut short, spliced or extended; or noise."""
    ext = draw(st.sampled_from(sorted(seeds)))
    if draw(st.integers(0, 5)) == 0:
        return ext, draw(st.binary(max_size=300))
    data = bytearray(seeds[ext])
    for _ in range(draw(st.integers(1, 6))):
        how = draw(st.sampled_from(("flip", "cut", "insert", "overwrite")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 4] = draw(st.sampled_from((b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff")))
    return ext, bytes(data)


@FUZZ
@given(mutated(SEEDS))
def test_image_loader_raises_only_trainer_errors(case):
    from trainer.data.images import load_image

    ext, data = case
    path = scratch(f"image.{ext}", data)
    for min_size in (0, 4):
        try:
            img = load_image(path, min_size=min_size)
        except TrainerError as err:
            assert "image." in str(err) and "cannot be decoded" in str(err)
        else:
            assert img.mode == "RGB" and min(img.size) > 0


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=80).map(lambda t: t.encode("utf-8")),
                 st.text(max_size=40).map(lambda t: t.encode("utf-16"))))
def test_caption_reader_raises_only_trainer_errors(data):
    from trainer.data.scan import scan_dataset

    folder = SCRATCH / "captions"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(SEEDS["png"])
    (folder / "a.txt").write_bytes(data)
    try:
        report = scan_dataset(folder, trigger_word="zkw", resolution=64)
    except TrainerError:
        return
    assert report.num_images == 1
    caption = report.items[0].caption
    assert caption.startswith("zkw") and "\n" not in caption


def _lora_seed() -> bytes:
    t = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight": torch.ones(2, 8),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight": torch.ones(8, 2),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.alpha": torch.tensor(2.0)}
    return save_safetensors(t, {"ss_network_dim": "2"})


MODULE = st.sampled_from(("lora_unet_a_b", "lora_te_x", "unet.down.to_q", "text_encoder.q_proj"))
PART = st.sampled_from(("lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
                        "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lora_mid.weight",
                        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "weight", "diff"))
SHAPE = st.lists(st.integers(0, 4), max_size=4)


@FUZZ
@given(st.one_of(mutated({"safetensors": _lora_seed()}).map(lambda c: c[1]),
                 st.dictionaries(st.tuples(MODULE, PART).map(".".join), SHAPE, max_size=6).map(
                     lambda parts: save_safetensors({k: torch.ones(s) for k, s in parts.items()}))))
def test_lora_importer_raises_only_trainer_errors(data):
    from trainer.files.adapters import read_lora_file

    path = scratch("lora.safetensors", data)
    try:
        lora = read_lora_file(path)
    except TrainerError as err:
        assert "lora.safetensors" in str(err)
        return
    assert lora.modules


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=3), max_leaves=8)


def _config_keys():
    from trainer.config import field_names

    return st.sampled_from(field_names() + ["version", "description", "no_such_setting"])


@FUZZ
@given(st.one_of(st.dictionaries(_config_keys(), JSON, max_size=5), JSON))
def test_config_values_raise_only_trainer_errors(data):
    from trainer.config import from_dict

    try:
        config = from_dict(data)
    except TrainerError:
        return
    config.validate()                      # returns errors, never raises


@FUZZ
@given(st.one_of(st.dictionaries(_config_keys(), JSON, max_size=4).map(lambda d: json.dumps(d).encode()),
                 st.binary(max_size=200), st.text(max_size=120).map(str.encode)), st.sampled_from(("json", "toml")))
def test_config_and_preset_files_raise_only_trainer_errors(data, ext):
    from trainer.config import load_config, load_preset, resolve

    path = scratch(f"settings.{ext}", data)
    try:
        resolve(str(path))                 # a preset file (the CLI's --preset FILE)
    except TrainerError:
        pass
    try:
        load_preset(str(path))
    except TrainerError:
        pass
    if ext == "json":
        try:
            load_config(path)              # a run's config.json (--config, --resume, the UI's saved form)
        except TrainerError as err:
            assert "settings.json" in str(err) or err.field
