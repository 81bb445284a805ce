"""The effect check on real runs of the built-in model with examples/zkw (docs/EFFECT.md has the calibration):
a short quick-preset run learns (strong or weak, scores rising with strength), an lr-1e-9 run gets ``none`` (through
the CLI, whose effect line comes just before the adapter path), a run at a high learning rate gets ``overbaked``;
the on-demand check (Preview tab, `python -m trainer effect`) repeats the in-training verdict; a failing renderer
leaves the adapter and verdict ``unknown``; ``effect_check = false`` skips it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import quick_config, tiny_base
from trainer.config import resolve
from trainer.events import Effect, Finished
from trainer.loop.train import train
from trainer.render import effect
from trainer.render.effect_grid import grid_size

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "zkw"
LINE = re.compile(r"^effect: (strong|weak|none|overbaked) \(\d\.\d\d at 1\.0 vs \d\.\d\d at 0\)$")
# The shortest runs that give the calibrated verdicts (docs/EFFECT.md): steps at the quick preset's batch of 4.
QUICK_STEPS, HOT_STEPS, HOT_LR = 180, 60, 3e-2
KEYS = {"verdict", "reason", "advice", "prompts", "seeds", "strengths", "scores", "base_score", "dataset_score",
        "spread", "change", "scorer", "adapter", "grid", "error"}


def _train_zkw(out: Path, **overrides) -> tuple[Path, list]:
    events: list = []
    config = resolve("quick", {"data_dir": str(DATA), "trigger_word": "zkw", "output_dir": str(out), **overrides})
    path = train(config, listeners=[events.append])
    return path, events


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _train_zkw(tmp_path_factory.mktemp("effect") / "quick", max_train_steps=QUICK_STEPS)


@pytest.fixture(scope="module")
def hot_run(tmp_path_factory):
    return _train_zkw(tmp_path_factory.mktemp("effect") / "hot", max_train_steps=HOT_STEPS, learning_rate=HOT_LR)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)


def _check_files(run_dir: Path) -> dict:
    data = json.loads((run_dir / "effect.json").read_text())
    assert set(data) == KEYS
    assert data["strengths"] == [0.0, 0.5, 1.0, 1.5] and data["seeds"] == list(effect.SEEDS)
    assert data["prompts"][0] == "zkw" and 2 <= len(data["prompts"]) <= 4
    assert len(data["scores"]) == 4 and data["base_score"] == data["scores"][0]
    assert data["advice"] == effect.ADVICE[data["reason"]] and effect.VERDICT_OF[data["reason"]] == data["verdict"]
    from PIL import Image
    with Image.open(run_dir / "effect.png") as im:     # rows = strengths, columns = seeds (a block per prompt)
        assert im.size == grid_size(4, len(effect.SEEDS), len(data["prompts"]))
    assert data["grid"] == str(run_dir / "effect.png")
    return data


def test_quick_preset_learns_and_scores_rise_with_strength(quick_run):
    path, events = quick_run
    data = _check_files(path.parent)
    assert data["verdict"] in ("strong", "weak"), data
    s = data["scores"]
    assert s[2] > s[0] + data["spread"] and s[3] > s[0] + data["spread"]
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("Effect") < kinds.index("Finished") == len(kinds) - 1
    got = next(e for e in events if isinstance(e, Effect))
    assert got.verdict == data["verdict"] and LINE.match(f"effect: {got.line}")


def test_overtrained_run_is_overbaked(hot_run):
    path, _ = hot_run
    data = _check_files(path.parent)
    assert data["verdict"] == "overbaked", data


def test_dead_run_is_none_and_the_cli_prints_it_before_the_adapter_path(tmp_path):
    out = tmp_path / "dead"
    done = _cli("train", "--data", str(DATA), "--out", str(out), "--preset", "quick", "--trigger", "zkw", "--steps",
                "2", "--lr", "1e-9", "--quiet")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == str(out / "lora.safetensors") and Path(lines[-1]).is_file()
    assert LINE.match(lines[-2]) and lines[-2].startswith("effect: none"), lines
    data = _check_files(out)
    assert data["reason"] == "no-change" and data["change"] < effect.MIN_CHANGE
    # on demand, into another folder: the same verdict
    again = _cli("effect", "--lora", lines[-1], "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == lines[-2]
    assert _check_files(tmp_path / "again")["scores"] == data["scores"]


def test_preview_check_repeats_the_training_verdict(quick_run, tmp_path):
    from app.service import Service

    path, _ = quick_run
    trained = json.loads((path.parent / "effect.json").read_text())
    service = Service(path.parent.parent)               # adapters are opened only under the outputs folder
    got = service.check_effect("", str(path))           # model and dataset from the run's config.json
    assert got["verdict"] == trained["verdict"] and got["line"].startswith(trained["verdict"])
    assert got["scores"] == pytest.approx(trained["scores"], abs=0.01)
    with pytest.raises(Exception, match="does not exist"):
        service.check_effect("", str(path), data_dir=str(tmp_path / "nowhere"))


def test_a_failing_check_keeps_the_adapter_and_says_unknown(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(effect, "render_strengths", broken)
    events: list = []
    path = train(quick_config(tmp_path, trigger_word="sq"), base=tiny_base(), listeners=[events.append])
    assert path.is_file() and path.stat().st_size > 0
    data = json.loads((tmp_path / "run" / "effect.json").read_text())
    assert data["verdict"] == "unknown" and "RuntimeError: renderer exploded" in data["error"]
    assert data["grid"] is None and not (tmp_path / "run" / "effect.png").exists()
    got = next(e for e in events if isinstance(e, Effect))
    assert got.verdict == "unknown" and "renderer exploded" in got.line
    assert isinstance(events[-1], Finished) and events[-1].path == str(path)
    logs = [e.message for e in events if type(e).__name__ == "Log"]
    assert any("effect check failed" in m for m in logs)


def test_effect_check_off(tmp_path):
    events: list = []
    train(quick_config(tmp_path, effect_check=False), base=tiny_base(), listeners=[events.append])
    assert not (tmp_path / "run" / "effect.json").exists()
    assert not any(isinstance(e, Effect) for e in events)


def test_check_leaves_the_base_as_training_left_it(tmp_path):
    """The in-training check attaches the saved file next to the trained layers; afterwards only the trained
    layers remain, switched on, so a caller's ``base`` renders and scores as the trained model."""

    from trainer.files.adapters import attached

    base = tiny_base()
    path = train(quick_config(tmp_path, trigger_word="sq"), base=base)
    data = json.loads((tmp_path / "run" / "effect.json").read_text())
    assert data["verdict"] != "unknown", data["error"]
    assert attached(base.components()) == ["default"]
    layer = next(m for m in base.unet.modules() if hasattr(m, "scaling") and "default" in getattr(m, "scaling", {}))
    assert layer.scaling["default"] == pytest.approx(4.0 / 4) and "default" in layer.active_adapters
    assert path.is_file()
