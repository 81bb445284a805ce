"""The command line: bad inputs give one clear line (no traceback); train/generate work end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainer.cli import main
from trainer.render.generate import parse_lora_arg

ROOT = Path(__file__).resolve().parent.parent


def make_data(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(folder / f"x{i}.png")
        (folder / f"x{i}.txt").write_text("a blue square")
    return folder


def assert_one_error_line(err: str) -> None:
    """Exactly one 'error:' line, only indented continuation lines after it, no traceback."""
    lines = err.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1 and "Traceback" not in err, err
    assert all(line.startswith(" ") for line in lines[starts[0] + 1:]), err


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case,extra,words", [
    ("rank 0", ["--rank", "0"], ["rank", "0"]),
    ("negative alpha", ["--alpha", "-2"], ["alpha", "-2"]),
    ("resolution", ["--resolution", "100"], ["resolution", "100", "multiple of 8"]),
    ("missing model", ["--model", "/nowhere/model.safetensors"], ["/nowhere/model.safetensors"]),
])
def test_bad_flags_one_clear_error(tmp_path, capsys, case, extra, words):
    data = make_data(tmp_path / "data")
    code, out, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "o"), *extra)
    assert code == 2, case
    assert_one_error_line(err)
    for word in words:
        assert word in err, (case, err)


def test_empty_folder_and_unreadable_image(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "train", "--data", str(empty), "--out", str(tmp_path / "o"))
    assert code == 2 and str(empty) in err
    assert_one_error_line(err)

    data = make_data(tmp_path / "data")
    (data / "broken.png").write_bytes(b"not an image at all")
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "o2"),
                           "--steps", "1")
    assert code == 2 and "broken.png" in err
    assert_one_error_line(err)


def test_unknown_set_field(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "o"),
                           "--set", "nosie_offset=0.1")
    assert code == 2 and "nosie_offset" in err


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert parse_lora_arg(r"C:\x\a.safetensors") == (r"C:\x\a.safetensors", 1.0)


def test_train_then_generate_subprocess_on_builtin(tmp_path):
    """The README's flow, as a user runs it: the adapter path is the last stdout line."""
    data = make_data(tmp_path / "data", n=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = subprocess.run([sys.executable, "-m", "trainer", "train", "--data", str(data), "--out",
                            str(tmp_path / "run"), "--steps", "3", "--rank", "4", "--quiet", "--no-effect-check"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    adapter = Path(train.stdout.strip().splitlines()[-1])
    assert adapter == tmp_path / "run" / "lora.safetensors" and adapter.is_file()
    out = tmp_path / "img.png"
    gen = subprocess.run([sys.executable, "-m", "trainer", "generate", "--prompt", "a blue square",
                          "--lora", f"{adapter}:0.8", "--steps", "2", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr
    assert Image.open(out).size[0] >= 32


def test_report_reads_the_caption_extension_given(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(data / f"x{i}.png")
        (data / f"x{i}.caption").write_text(f"a blue square, tag {i}", encoding="utf-8")
    code, out, _ = run_cli(capsys, "report", "--data", str(data))
    assert code == 0 and "0 from files" in out and "(.txt missing or empty)" in out
    code, out, _ = run_cli(capsys, "report", "--data", str(data), "--caption-extension", ".caption")
    assert code == 0 and "3 from files" in out and "missing or empty" not in out
    assert "a blue square (3)" in out
    code, _, err = run_cli(capsys, "report", "--data", str(data), "--caption-extension", "cap/tion")
    assert code == 2 and "caption_extension" in err and "cap/tion" in err
    assert_one_error_line(err)
