"""Auto-captioning (trainer/data/autocaption.py, `python -m trainer caption`) on tiny captioning models built from
configs: one caption file per image, existing ones kept unless --overwrite, the prefix put first, the caption
extension followed, clear errors for a missing or wrong model. Caption quality is not tested, the plumbing is."""
from __future__ import annotations

import csv
import importlib.util

import pytest
from PIL import Image

from trainer.cli import main
from trainer.data.autocaption import caption_folder, load_captioner
from trainer.errors import TrainerError
from tests.tiny_models import CAPTION_WORDS, tiny_captioner


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return tiny_captioner(tmp_path_factory.mktemp("models") / "blip", "blip")


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + 8 * i, 36), (60 * i, 200, 30)).save(folder / f"img_{i}.png")
    return folder


def _words_of(text: str) -> set[str]:
    return {w for w in text.replace(",", " ").split()}


def test_caption_command_writes_missing_captions_keeps_existing_and_applies_the_prefix(blip, tmp_path, capsys):
    data = _images(tmp_path / "data")
    (data / "img_1.txt").write_text("my own caption", encoding="utf-8")
    (data / "notes.md").write_text("not an image", encoding="utf-8")
    assert main(["caption", "--data", str(data), "--model", str(blip), "--prefix", "zkw"]) == 0
    assert "Captioned 2 image(s); kept 1 existing caption(s)." in capsys.readouterr().out
    assert sorted(p.name for p in data.glob("*.txt")) == ["img_0.txt", "img_1.txt", "img_2.txt"]
    assert (data / "img_1.txt").read_text(encoding="utf-8") == "my own caption"
    for name in ("img_0.txt", "img_2.txt"):
        text = (data / name).read_text(encoding="utf-8")
        assert text.startswith("zkw, ") and len(text) > len("zkw, "), text
        assert _words_of(text[5:]) <= set(CAPTION_WORDS), text      # decoded from the model's own vocabulary

    assert main(["caption", "--data", str(data), "--model", str(blip), "--overwrite"]) == 0
    assert "Captioned 3 image(s); kept 0 existing caption(s)." in capsys.readouterr().out
    assert (data / "img_1.txt").read_text(encoding="utf-8") != "my own caption"
    assert not (data / "img_1.txt").read_text(encoding="utf-8").startswith("zkw")


def test_git_model_caption_extension_kohya_folders_and_unreadable_images(tmp_path):
    git = load_captioner(tiny_captioner(tmp_path / "git", "git"), max_new_tokens=5)
    data = _images(tmp_path / "data", n=1)
    _images(data / "10_subject", n=2)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "img_0.txt").write_text("a .txt caption is not a .caption", encoding="utf-8")
    result = caption_folder(data, git, caption_extension=".caption", batch_size=2)
    assert result.written == ["img_0.png", "10_subject/img_0.png", "10_subject/img_1.png"]
    assert [name for name, _ in result.failed] == ["broken.png"] and not result.kept
    assert (data / "img_0.caption").is_file() and (data / "10_subject" / "img_1.caption").is_file()
    assert (data / "img_0.txt").read_text(encoding="utf-8") == "a .txt caption is not a .caption"
    assert "1 image(s) could not be read: broken.png" in result.summary()


def test_no_model_or_a_wrong_one_is_a_clear_error(tmp_path, capsys):
    data = _images(tmp_path / "data", n=1)
    assert main(["caption", "--data", str(data)]) == 2
    assert "No captioning model is set; give a local folder" in capsys.readouterr().err
    with pytest.raises(TrainerError, match="'/no/such/model' is not a folder"):
        load_captioner("/no/such/model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainerError, match="neither a config.json .* nor model.onnx"):
        load_captioner(empty)
    from transformers import CLIPTextConfig
    CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "text-only")
    with pytest.raises(TrainerError, match="is a 'clip_text_model' model, not an image-to-text one"):
        load_captioner(tmp_path / "text-only")
    assert main(["caption", "--data", str(tmp_path / "nowhere"), "--model", str(empty)]) == 2
    assert "Dataset folder" in capsys.readouterr().err and not list(data.glob("*.txt"))


def _tiny_tagger(folder):
    """A WD14-shaped ONNX tagger: [N, 32, 32, 3] BGR -> per-channel means / 255, tags = the three channels."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("Div", ["mean", "scale"], ["probs"])]
    graph = helper.make_graph(nodes, "tagger", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", 32, 32, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder / "model.onnx")
    with (folder / "selected_tags.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        w.writerows([[0, "blue_sky", 0, 10], [1, "general", 9, 10], [2, "red_theme", 0, 10]])
    return folder


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="the ONNX tagger path needs onnxruntime (the optional 'caption' extra) and onnx to "
                           "build a tiny tagger")
def test_onnx_tagger_folder(tmp_path):
    tagger = load_captioner(_tiny_tagger(tmp_path / "wd14"))
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (20, 40), (255, 0, 0)).save(data / "red.png")        # padded white: blue and green 0.5
    Image.new("RGB", (32, 32), (0, 0, 255)).save(data / "blue.png")
    result = caption_folder(data, tagger, prefix="zkw")
    assert sorted(result.written) == ["blue.png", "red.png"]
    assert (data / "red.txt").read_text(encoding="utf-8") == "zkw, red theme, blue sky"       # rating tags left out
    assert (data / "blue.txt").read_text(encoding="utf-8") == "zkw, blue sky"
