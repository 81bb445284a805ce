"""The web UI's service layer, run folders and datasets: uploads (files, captions, .zip), folder imports,
caption edits, bulk actions, run names, the dataset report and a model's native size. See test_service.py for
the rest of the service.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.service import TrainerError
from tests.service_helpers import make_dataset


# --- datasets --------------------------------------------------------------------------------
def test_upload_matches_captions_by_stem_and_skips_other_files(service, tmp_path):
    src = make_dataset(tmp_path / "src", n=3)
    (src / "notes.pdf").write_bytes(b"%PDF")
    (src / "img_01.txt").write_text("  line one\n", encoding="utf-8")
    note = service.add_files("run1", sorted(src.iterdir()))
    assert "3 image(s) and 3 caption file(s)" in note and "notes.pdf" in note
    items = service.dataset_items("run1")
    assert [n for n, _, _ in items] == ["img_00.png", "img_01.png", "img_02.png"]
    assert items[1][2] == "line one"
    assert Path(items[0][1]).parent == service.outputs / "run1" / "dataset"


def test_zip_upload_is_flattened_and_safe(service, tmp_path):
    buf = io.BytesIO()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("set/a.png", png.getvalue())
        zf.writestr("set/a.txt", "caption a")
        zf.writestr("../../evil.png", png.getvalue())
        zf.writestr("/abs/b.png", png.getvalue())
        zf.writestr("__MACOSX/set/._a.png", b"junk")
        link = zipfile.ZipInfo("set/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("set/readme.md", "x")
    archive = tmp_path / "data.zip"
    archive.write_bytes(buf.getvalue())
    service.add_files("zipped", [archive])
    d = service.dataset_dir("zipped")
    assert sorted(p.name for p in d.iterdir()) == ["a.png", "a.txt", "b.png", "evil.png"]
    assert not (service.outputs / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    assert service.dataset_items("zipped")[0][2] == "caption a"


def test_bad_zip_is_a_readable_error(service, tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TrainerError, match="broken.zip.*not a readable .zip"):
        service.add_files("r", [bad])


def test_captions_edit_and_bulk_actions(service, tmp_path):
    service.add_files("r", sorted(make_dataset(tmp_path / "src", n=3).iterdir()))
    service.set_caption("r", "img_00.png", "a  red\nsquare ")
    assert (service.dataset_dir("r") / "img_00.txt").read_text(encoding="utf-8") == "a red square"
    assert service.bulk_prefix("r", "zkw") == 3
    assert service.bulk_prefix("r", "zkw") == 0          # idempotent
    assert service.dataset_items("r")[0][2] == "zkw, a red square"
    assert service.bulk_replace("r", "white disc", "ring") == 2
    assert service.dataset_items("r")[1][2] == "zkw, a ring on colour 1"
    service.remove_image("r", "img_02.png")
    assert [n for n, _, _ in service.dataset_items("r")] == ["img_00.png", "img_01.png"]
    assert service.bulk_clear("r") == 2
    assert all(c == "" for _, _, c in service.dataset_items("r"))
    with pytest.raises(TrainerError, match="trigger word is empty"):
        service.bulk_prefix("r", " , ")
    with pytest.raises(TrainerError, match="not in the dataset"):
        service.set_caption("r", "../../etc/passwd", "x")


def test_run_names_are_checked(service):
    for bad in ("", "../up", "a/b", "_blends", ".hidden"):
        with pytest.raises(TrainerError, match="Run name"):
            service.run_dir(bad)
    assert service.run_dir("my-lora_2.v1") == service.outputs / "my-lora_2.v1"


def test_import_folder_and_report_warns_outside_30_to_50(service, tmp_path):
    src = make_dataset(tmp_path / "src", n=5, captions=False)
    service.import_folder("r", str(src))
    report = service.dataset_report("r", trigger_word="zkw", resolution=64)
    assert report["num_images"] == 5
    assert any("30-50" in w for w in report["warnings"])
    assert "5 images" in report["text"]
    with pytest.raises(TrainerError, match="does not exist"):
        service.import_folder("r", str(tmp_path / "nope"))
    assert service.dataset_report("empty-run")["num_images"] == 0


def test_image_extensions_match_the_trainer():
    """app/runs.py keeps its own copy so the page starts without importing torch; it must not drift."""
    from app.service import IMAGE_EXTENSIONS
    from trainer.data.images import IMAGE_EXTENSIONS as TRAINER_EXTENSIONS

    assert IMAGE_EXTENSIONS == TRAINER_EXTENSIONS


def test_native_resolution_of_builtin_comes_from_its_configs(service):
    from app.service import BUILTIN_MODEL_DIR
    from trainer.models.builtin import BUILTIN_DIR

    assert BUILTIN_MODEL_DIR == BUILTIN_DIR
    assert service.native_resolution("builtin") == 64
    assert service.native_resolution("/nowhere/sdxl-base.safetensors") == 1024


# --- caption tools -------------------------------------------------------------------------------
def test_preview_captions_keeps_the_trigger_first_and_shuffles_the_rest(service, tmp_path):
    src = make_dataset(tmp_path / "src", n=4)
    for i in range(4):
        (src / f"img_{i:02d}.txt").write_text(f"disc, colour {i}, square, small, white", encoding="utf-8")
    service.add_files("r", sorted(src.iterdir()))
    rows = service.preview_captions("r", True, 1, 0.0, trigger_word="zkw")
    assert [name for name, _, _ in rows] == ["img_00.png", "img_01.png", "img_02.png"]
    for name, written, trained in rows:
        assert written.startswith("zkw, disc, colour")              # the trigger word, as training adds it
        assert trained.split(", ")[0] == "zkw"
        assert sorted(trained.split(", ")) == sorted(written.split(", "))
    assert rows == service.preview_captions("r", True, 1, 0.0, trigger_word="zkw")   # same seed, same draw
    draws = {service.preview_captions("r", True, 1, 0.0, seed=s, trigger_word="zkw")[0][2] for s in range(20)}
    assert len(draws) > 1
    off = service.preview_captions("r", False, 1, 0.0, trigger_word="zkw")
    assert all(written == trained for _, written, trained in off)


def test_preview_captions_refuses_keep_tokens_beyond_a_caption_and_bad_values(service, tmp_path):
    service.add_files("r", sorted(make_dataset(tmp_path / "src", n=2).iterdir()))
    service.set_caption("r", "img_00.png", "disc, blue, big")
    service.set_caption("r", "img_01.png", "disc, blue")
    with pytest.raises(TrainerError) as err:
        service.preview_captions("r", True, 3, 0.0)
    assert err.value.field == "keep_tokens" and "'img_01.png'" in str(err.value) and "= 3" in str(err.value)
    assert service.preview_captions("r", False, 3, 0.0)           # nothing moves: the whole caption is kept
    with pytest.raises(TrainerError) as err:
        service.preview_captions("r", True, 1, 1.5)
    assert err.value.field == "tag_dropout"
    with pytest.raises(TrainerError) as err:
        service.preview_captions("empty-run", True, 1, 0.1)
    assert err.value.field == "data_dir"


def test_caption_extension_is_followed_by_report_and_preview(service, tmp_path):
    service.add_files("r", sorted(make_dataset(tmp_path / "src", n=3, captions=False).iterdir()))
    for i in range(3):
        (service.dataset_dir("r") / f"img_{i:02d}.caption").write_text(f"disc, tag {i}", encoding="utf-8")
    assert len(service.dataset_report("r", resolution=64)["missing_captions"]) == 3
    report = service.dataset_report("r", resolution=64, caption_extension=".caption")
    assert report["missing_captions"] == [] and report["items"][0]["caption"] == "disc, tag 0"
    rows = service.preview_captions("r", True, 1, 0.0, caption_extension=".caption")
    assert rows[2][1] == "disc, tag 2"
    with pytest.raises(TrainerError) as err:
        service.dataset_report("r", caption_extension="caption")
    assert err.value.field == "caption_extension"
