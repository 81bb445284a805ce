"""What the Dataset tab keeps per run (app/dataset_state.py): settings as typed, the files an upload did not add
and why, images that cannot be decoded (marked, removable in one go, and refused before training starts)."""
from __future__ import annotations

import io
import json
import zipfile

import pytest
from PIL import Image

from app.service import Service, TrainerError
from tests.service_helpers import make_dataset


def _broken(path):
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png, "PNG")
    path.write_bytes(png.getvalue()[:60])          # a truncated copy: the header reads, the pixels do not
    return path


def test_upload_counts_only_decodable_images_and_keeps_a_list_of_what_it_did_not_add(service, tmp_path):
    src = make_dataset(tmp_path / "src", n=3)
    (src / "notes.pdf").write_bytes(b"%PDF-1.4")
    _broken(src / "broken.png")
    note = service.add_files("r", sorted(src.iterdir()))
    assert note.startswith("Added 3 image(s) and 3 caption file(s); 2 file(s) not added (broken.png, notes.pdf)")
    assert [n for n, _, _ in service.dataset_items("r")] == ["img_00.png", "img_01.png", "img_02.png"]
    rejected = dict(service.rejected_files("r"))
    assert set(rejected) == {"broken.png", "notes.pdf"}
    assert rejected["broken.png"].startswith("cannot be decoded: the file is truncated")
    assert rejected["notes.pdf"].startswith("not an image")

    again = Service(service.outputs, presets_dir=service.presets_dir)       # a restarted UI still lists them
    assert dict(again.rejected_files("r")) == rejected
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    Image.new("RGB", (32, 32)).save(fixed / "broken.png")                    # re-saved and uploaded again
    assert service.add_files("r", [fixed / "broken.png"]) == "Added 1 image(s) and 0 caption file(s)."
    assert [n for n, _ in service.rejected_files("r")] == ["notes.pdf"]
    service.clear_rejected("r")
    assert service.rejected_files("r") == []


def test_zip_members_that_cannot_be_decoded_are_named_with_the_archive(service, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", png.getvalue())
        zf.writestr("bad.jpg", b"\xff\xd8\xff not really")
        zf.writestr("readme.md", "x")
        zf.writestr("__MACOSX/._a.png", b"junk")
    assert service.add_files("z", [archive]).startswith("Added 1 image(s)")
    assert [n for n, _ in service.rejected_files("z")] == ["set.zip: bad.jpg", "set.zip: readme.md"]


def test_dataset_settings_are_kept_with_the_run_as_typed(service, tmp_path):
    assert service.dataset_settings("new-run") == {}
    service.save_dataset_setting("new-run", "trigger_word", "zkw")
    service.save_dataset_setting("new-run", "caption_model", "/models/blip")
    again = Service(service.outputs, presets_dir=service.presets_dir)
    assert again.dataset_settings("new-run") == {"trigger_word": "zkw", "caption_model": "/models/blip"}
    with pytest.raises(TrainerError, match="'resolution' is not a dataset setting"):
        service.save_dataset_setting("new-run", "resolution", "512")

    # a run trained before the settings were kept: its config.json's trigger word; typing a new one wins
    run_dir = service.run_dir("old")
    run_dir.mkdir()
    config = {**json.loads(service.build_config("old", service.default_form()).to_json()), "trigger_word": "ohwx"}
    (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert service.dataset_settings("old") == {"trigger_word": "ohwx"}
    assert service.saved_form("old")["trigger_word"] == "ohwx"
    service.save_dataset_setting("old", "trigger_word", "zkw2")
    assert service.saved_form("old")["trigger_word"] == "zkw2"


def test_unreadable_images_are_found_removed_and_refused_before_training(service, tmp_path):
    service.add_files("r", sorted(make_dataset(tmp_path / "src", n=3).iterdir()))
    assert service.unreadable_images("r") == {}
    _broken(service.dataset_dir("r") / "broken.png")               # copied in by hand, or damaged on disk
    (service.dataset_dir("r") / "broken.txt").write_text("a caption", encoding="utf-8")
    assert list(service.unreadable_images("r")) == ["broken.png"]
    with pytest.raises(TrainerError, match=r"Not started: 1 file\(s\) .* broken.png \(the file is truncated.*"
                                           r"1\. Dataset tab.*Remove unreadable files"):
        service.start_training("r", {**service.preset_form("quick"), "max_train_steps": 1})
    assert service.jobs.snapshot().state == "idle"                  # nothing was started
    assert service.remove_unreadable("r") == ["broken.png"]
    assert not (service.dataset_dir("r") / "broken.txt").exists()
    assert len(service.dataset_items("r")) == 3 and service.unreadable_images("r") == {}


def test_the_page_opens_on_the_run_it_asked_for_when_that_run_exists(service, tmp_path):
    from app.page_state import pick_run, run_notice

    service.add_files("mine", sorted(make_dataset(tmp_path / "src", n=2).iterdir()))
    service.add_files("newer", sorted(make_dataset(tmp_path / "src2", n=2).iterdir()))
    assert pick_run(service, "mine") == "mine"
    assert pick_run(service, "") == service.default_run() == "newer"
    assert pick_run(service, "deleted-since") == "newer" and pick_run(service, "../etc") == "newer"
    assert run_notice(service, "mine").count("<div") == 1 and "Run folder:" in run_notice(service, "mine")


def test_caption_dataset_without_a_model_says_what_to_set(service, tmp_path):
    service.add_files("r", sorted(make_dataset(tmp_path / "src", n=1, captions=False).iterdir()))
    with pytest.raises(TrainerError, match="No captioning model is set"):
        service.caption_dataset("r", "  ")
    with pytest.raises(TrainerError, match="caption_extension"):
        service.caption_dataset("r", "/models/x", caption_extension="txt/")
    assert not list(service.dataset_dir("r").glob("*.txt"))
