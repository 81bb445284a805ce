"""The effect check's parts without a model: the image score, the verdict rule, the prompts, the grid, the
snapshot fold and the run-list label."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from trainer.demo.concept import make_concept_dataset
from trainer.demo.shapes import COLOURS
from trainer.render import effect
from trainer.render.effect_grid import grid_size, write_grid
from trainer.render.score import ClipScorer, ImageScorer, colour_histogram, edge_descriptor


def _shape(colour, background, box=(16, 16, 48, 48)) -> Image.Image:
    img = Image.new("RGB", (64, 64), background)
    img.paste(colour, box)
    return img


def test_score_prefers_images_like_the_training_set():
    dataset = [im for im, _ in make_concept_dataset(12, seed=3)]
    held_out = [im for im, _ in make_concept_dataset(4, seed=99)]
    others = [_shape(COLOURS["red"], COLOURS["blue"]), _shape(COLOURS["yellow"], COLOURS["green"])]
    scorer = ImageScorer(dataset)
    near, far = scorer.scores(held_out), scorer.scores(others)
    assert np.all((near > 0) & (near <= 1)) and np.all((far >= 0) & (far < 1))
    assert near.min() > far.max() + 0.2
    assert 0.5 < scorer.dataset_score <= 1


def test_score_sees_structure_not_only_colour():
    """Same colours, different layout: a solid half/half split vs thin stripes score differently."""
    stripes = Image.fromarray(np.kron(np.tile([[255], [0]], (16, 64)), np.ones((1, 1))).astype(np.uint8)).convert("RGB")
    halves = np.zeros((64, 64), np.uint8)
    halves[32:] = 255
    halves = Image.fromarray(halves).convert("RGB")
    assert abs(colour_histogram(np.asarray(stripes) / 255.0) - colour_histogram(np.asarray(halves) / 255.0)).sum() < 0.1
    scorer = ImageScorer([stripes])
    assert scorer.scores([stripes])[0] > scorer.scores([halves])[0] + 0.2


def test_edge_descriptor_of_a_flat_image_is_defined():
    d = edge_descriptor(np.full((64, 64, 3), 0.5, np.float32))
    assert np.isfinite(d).all() and d.sum() == pytest.approx(1.0)


def test_scorer_needs_reference_images():
    with pytest.raises(Exception, match="training images"):
        ImageScorer([])


def test_clip_scorer_with_a_local_folder(tmp_path):
    """A tiny CLIP vision tower saved here (no downloads): the training image itself scores highest."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "clip")
    dataset = [im for im, _ in make_concept_dataset(3, seed=1)]
    scorer = ClipScorer(dataset[:1], tmp_path / "clip")
    scores = scorer.scores([dataset[0], _shape(COLOURS["red"], COLOURS["blue"])])
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] < scores[0]
    with pytest.raises(Exception, match="clip-model"):
        ClipScorer(dataset, tmp_path / "nothing")


@pytest.mark.parametrize("means,change,reason", [
    ((0.36, 0.36, 0.36, 0.36), 0.0, "no-change"),     # nothing changes (lr 1e-9)
    ((0.36, 0.36, 0.362, 0.37), 1.0, "no-gain"),      # changes, but not towards the data beyond the seed spread
    ((0.36, 0.37, 0.38, 0.385), 1.0, "weak"),
    ((0.36, 0.40, 0.49, 0.48), 3.0, "strong"),
    ((0.36, 0.55, 0.40, 0.30), 3.0, "drift"),         # 0.5 is closest; 1.0 drifts away again
    ((0.36, 0.45, 0.50, 0.20), 3.0, "collapse"),      # 1.5 falls apart
    ((0.36, 0.45, 0.60, 0.57), 3.0, "strong"),        # 1.5 a little lower, a small share of the gain: holds
    ((0.36, 0.30, 0.25, 0.24), 3.0, "away"),          # moves far away from the data at every strength
])
def test_verdict_rule(means, change, reason):
    scores = np.asarray(means)[:, None, None] + np.tile([-0.01, 0.0, 0.01], (4, 2, 1))   # seed spread 0.01
    got, spread = effect.decide(scores, change)
    assert got == reason and spread == pytest.approx(0.01)
    assert effect.VERDICT_OF[got] in effect.VERDICTS and got in effect.ADVICE


def test_prompts_are_the_trigger_then_distinct_captions():
    caps = ["zkw, a", "zkw, a", "zkw, b", "zkw, c", "zkw, d"]
    assert effect.effect_prompts(caps, "zkw") == ["zkw", "zkw, a", "zkw, b", "zkw, c"]
    assert effect.effect_prompts(caps) == ["zkw, a", "zkw, b", "zkw, c"]
    assert effect.effect_prompts([], "") == [""]


def test_grid_has_a_row_per_strength_and_a_column_per_seed(tmp_path):
    strengths, seeds, prompts = (0.0, 0.5, 1.0, 1.5), (0, 1, 2), ["zkw", "zkw, a zkw emblem"]
    images = [[[_shape((40 * k, 20 * r, 200), (250, 250, 250)) for k in seeds] for _ in prompts]
              for r in range(len(strengths))]
    scores = np.random.default_rng(0).uniform(size=(4, 2, 3))
    path = write_grid(tmp_path / "effect.png", images, scores, strengths, seeds, prompts)
    with Image.open(path) as im:
        assert im.size == grid_size(len(strengths), len(seeds), len(prompts))
        from trainer.render.effect_grid import CELL, HEADER_H, LABEL_W
        assert im.size[1] == HEADER_H + 4 * CELL and im.size[0] >= LABEL_W + 6 * CELL
        # the cell of strength 1.0, seed 2, prompt 0 holds that image (scaled up)
        cell = np.asarray(im.convert("RGB"))[HEADER_H + 2 * CELL + 40, LABEL_W + 2 * CELL + 64]
        assert tuple(cell) == (80, 40, 200)


def test_result_line_and_json(tmp_path):
    r = effect.EffectResult(verdict="strong", advice="a", strengths=[0.0, 0.5, 1.0, 1.5], scores=[0.02, 0.3, 0.71, 0.7],
                            base_score=0.02)
    assert r.line() == "strong (0.71 at 1.0 vs 0.02 at 0)"
    effect.write_result(tmp_path, r)
    assert effect.read_result(tmp_path)["verdict"] == "strong"
    (tmp_path / "effect.json").write_text("{broken")
    assert effect.read_result(tmp_path) is None
    assert effect.EffectResult(verdict="unknown", advice="", error="boom").line() == "unknown (boom)"


def test_fold_and_run_list_show_the_verdict(tmp_path):
    from app.jobs import EventFold
    from app.runs import RunsMixin

    fold = EventFold()
    fold.add("Effect", SimpleNamespace(verdict="weak", line="weak (0.4 at 1.0 vs 0.3 at 0)", advice="train longer",
                                       path="x/effect.json", grid="x/effect.png"))
    snap = fold.snapshot(1, "finished", "r")
    assert dict(snap.effect)["verdict"] == "weak" and "effect check: weak" in snap.logs[-1]
    fold.add("Started", SimpleNamespace(total_steps=3, num_images=1, trainable_params=1))
    assert fold.snapshot(2, "running", "r").effect == ()

    run = tmp_path / "r"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 3, "total_steps": 3}))
    effect.write_result(run, effect.EffectResult(verdict="overbaked", advice=""))
    mixin = RunsMixin()
    mixin.outputs = tmp_path
    mixin.jobs = SimpleNamespace(overview=lambda: SimpleNamespace(current=SimpleNamespace(run="", active=False),
                                                                    ahead=lambda name: None))
    assert mixin.run_state("r") == "finished · effect: overbaked"
