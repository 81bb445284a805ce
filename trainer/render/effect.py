"""The "did it learn?" check: render the trigger prompt(s) at strengths 0 / 0.5 / 1 / 1.5 for a few fixed seeds,
score each image's similarity to the training images (``render/score.py``), and say whether the adapter does
anything: ``strong``, ``weak``, ``none`` or ``overbaked`` (``unknown`` when the check itself failed). Writes
``<run>/effect.json`` and ``<run>/effect.png`` (rows = strengths, columns = seeds, one block per prompt).
Thresholds and what was measured to set them: docs/EFFECT.md.
"""
from __future__ import annotations

import json
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import TrainerError
from ..fileio import atomic_write_text

STRENGTHS = (0.0, 0.5, 1.0, 1.5)
SEEDS = (0, 1, 2)
CHECK_STEPS = 12         # sampler steps per image (DPM++): enough to see what the adapter draws
MAX_CAPTIONS = 3          # the trigger word alone plus up to this many of the dataset's own captions
BATCH_PIXELS = 6 * 512 * 512    # pixels per pipeline call: 6 images of 512 px; SDXL 1024 px: one prompt (3)
MAX_REFERENCE = 64        # training images the score compares with (evenly picked from larger sets)
EFFECT_JSON, EFFECT_PNG = "effect.json", "effect.png"
VERDICTS = ("strong", "weak", "none", "overbaked", "unknown")

# Verdict thresholds (docs/EFFECT.md has the calibration runs they come from).
MIN_CHANGE = 0.15         # pixel change at 1.0 vs 0 (same seed) below this share of the change between seeds: none
STRONG_GAIN = 3.0         # score gain at 1.0 over 0 of at least this many seed spreads: strong (1 spread: weak)
DRIFT = 1.0               # 1.0 scoring this many spreads below the best lower strength: it drifts away again
COLLAPSE = 2.0            # 1.5 scoring this many spreads below 1.0, and
COLLAPSE_SHARE = 0.25     # losing at least this share of what 1.0 gained over 0: collapses
MIN_SPREAD = 0.01         # the spread's floor, so identical seeds do not make any difference look huge

ADVICE = {   # by the reason ``decide`` gives
    "strong": "The adapter moves the images towards the training set and holds up at 1.5; use it at 0.7-1.0.",
    "weak": "The adapter has a visible but small effect. Train longer (more steps or epochs) or raise the learning "
            "rate a little; use it at 1.0 or above meanwhile.",
    "no-change": "The adapter changes the images less than the seed does: it learned next to nothing. Raise the "
                 "learning rate or the steps, and check that the trigger word appears in the captions (the Dataset "
                 "tab's report shows it).",
    "no-gain": "The adapter changes the images but not towards the training set (less than the seed spread). "
               "Raise the learning rate or the steps, and check that the trigger word appears in the captions.",
    "drift": "The adapter overshoots: a lower strength looks more like the training set than 1.0. Train fewer "
             "steps, lower the learning rate or alpha, or use it at the best-scoring strength.",
    "collapse": "The adapter is close to breaking: at 1.5 the images fall apart. Use it at 1.0 or below, or train "
                "fewer steps or with a lower learning rate or alpha.",
    "away": "The adapter changes the images a lot, away from the training set: it is overtrained or broken. Train "
            "fewer steps, lower the learning rate or alpha.",
    "unknown": "The effect check could not run (see the log); the adapter is saved. Render it on the Preview tab.",
}
VERDICT_OF = {"strong": "strong", "weak": "weak", "no-change": "none", "no-gain": "none", "drift": "overbaked",
              "collapse": "overbaked", "away": "overbaked", "unknown": "unknown"}


@dataclass
class EffectResult:
    """What ``effect.json`` holds. ``scores`` are means per strength (over prompts and seeds), ``base_score``
    the score at strength 0, ``dataset_score`` the training images' own score (the ceiling), ``spread`` the
    seed-to-seed standard deviation of one image's score, ``change`` the pixel change from 0 to 1.0 for the same
    seed over the change between seeds at 0."""

    verdict: str
    advice: str
    reason: str = ""          # why: no-change / no-gain / weak / strong / drift / collapse / away (``decide``)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    strengths: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    base_score: float | None = None
    dataset_score: float | None = None
    spread: float | None = None
    change: float | None = None
    scorer: str = ""
    adapter: str = ""
    grid: str | None = None
    error: str | None = None

    def score_at(self, strength: float) -> float | None:
        return next((s for w, s in zip(self.strengths, self.scores) if w == strength), None)

    def line(self) -> str:
        """'strong (0.71 at 1.0 vs 0.02 at 0)', or 'unknown (why)'."""
        one = self.score_at(1.0)
        if one is None or self.base_score is None:
            return f"{self.verdict} ({self.error or 'no scores'})"
        return f"{self.verdict} ({one:.2f} at 1.0 vs {self.base_score:.2f} at 0)"

    def to_dict(self) -> dict:
        return asdict(self)


def effect_prompts(captions: Sequence[str], trigger_word: str = "") -> list[str]:
    """The trigger word alone (when there is one), then up to MAX_CAPTIONS distinct captions, in dataset order."""
    out = [trigger_word.strip()] if trigger_word.strip() else []
    for caption in captions:
        caption = caption.strip()
        if caption and caption not in out and len(out) < MAX_CAPTIONS + (1 if trigger_word.strip() else 0):
            out.append(caption)
    return out or [""]


def reference_images(paths: Sequence[str | Path], limit: int = MAX_REFERENCE) -> list:
    from ..data.images import load_image

    paths = list(paths)
    if len(paths) > limit:
        paths = [paths[round(i * (len(paths) - 1) / (limit - 1))] for i in range(limit)]
    return [load_image(p) for p in paths]


def render_strengths(renderer, adapter: str | Path, prompts: Sequence[str], *, strengths=STRENGTHS, seeds=SEEDS,
                     size: int | None = None, steps: int = 20, guidance: float = 7.0, text_encoding: dict | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[list[list]]:
    """images[strength][prompt][seed] (PIL). A pipeline call renders every seed of as many prompts as
    BATCH_PIXELS allows at this size (all of them on the built-in model; one prompt's seeds for SDXL)."""
    import contextlib

    import torch

    from .generate import fused

    base, pipe = renderer.base, renderer.pipeline
    size = size or base.resolution
    per_call = max(1, BATCH_PIXELS // (size * size) // len(seeds))
    groups = [list(prompts[i:i + per_call]) for i in range(0, len(prompts), per_call)]
    kwargs = [_batched_prompts(base, pipe, group, text_encoding or {}) for group in groups]
    out = []
    for strength in strengths:
        renderer.set_strengths({str(adapter): float(strength)})
        images = []
        for group, prompt_args in zip(groups, kwargs):
            if should_stop is not None and should_stop():
                raise TrainerError("The effect check was stopped before it finished.", field="effect_check")
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for _ in group for s in seeds]
            merged = fused(base.components()) if getattr(renderer, "fuse", False) else contextlib.nullcontext()
            with torch.no_grad(), merged:       # as the Preview renders: the adapter merged for the call
                images += pipe(**prompt_args, num_images_per_prompt=len(seeds), generator=generators, height=size,
                               width=size, num_inference_steps=steps, guidance_scale=guidance).images
        out.append([list(images[p * len(seeds):(p + 1) * len(seeds)]) for p in range(len(prompts))])
    return out


def _batched_prompts(base, pipe, prompts: Sequence[str], text_encoding: dict) -> dict:
    """One pipeline call's prompt arguments for all ``prompts``, encoded as training encoded captions."""
    import torch

    from ..models.text import prompt_kwargs

    zero = bool(pipe.config.get("force_zeros_for_empty_prompt"))
    each = [prompt_kwargs(base, p, **text_encoding, zero_empty_negative=zero) for p in prompts]
    merged = {}
    for key, value in each[0].items():
        values = [k[key] for k in each]
        merged[key] = torch.cat(values) if isinstance(value, torch.Tensor) else (None if value is None else values)
    return merged


def decide(scores: np.ndarray, change: float, strengths: Sequence[float] = STRENGTHS) -> tuple[str, float]:
    """(reason, spread) from ``scores[strength, prompt, seed]`` and the relative pixel change at 1.0 (``pixel_change``);
    the verdict is ``VERDICT_OF[reason]``. Spread: the seed-to-seed standard deviation of one image's score at 0
    and 1.0 (at least MIN_SPREAD)."""
    s = list(strengths)
    i0, i1 = s.index(0.0), s.index(1.0)
    if scores.shape[2] > 1:
        spread = max(float(np.sqrt(scores[[i0, i1]].var(axis=2, ddof=1).mean())), MIN_SPREAD)
    else:
        spread = MIN_SPREAD
    means = scores.mean(axis=(1, 2))
    gain = (means[i1] - means[i0]) / spread
    if change < MIN_CHANGE:
        return "no-change", spread
    lower = max(means[i] for i, w in enumerate(s) if w < 1.0)
    higher = [means[i] for i, w in enumerate(s) if w > 1.0]
    if lower - means[i1] >= DRIFT * spread and lower > means[i0] + spread:
        return "drift", spread            # it learned (a lower strength gets closer), then 1.0 drifts away again
    drop = means[i1] - min(higher) if higher else 0.0
    if drop >= COLLAPSE * spread and drop >= COLLAPSE_SHARE * abs(means[i1] - means[i0]):
        return "collapse", spread         # 1.5 falls apart
    if gain < -DRIFT:
        return "away", spread             # it changes the images a lot, away from the training set
    if gain < 1.0:
        return "no-gain", spread
    return ("strong" if gain >= STRONG_GAIN else "weak"), spread


def pixel_change(images: list[list[list]], strengths: Sequence[float] = STRENGTHS) -> float:
    """Mean |image at 1.0 - image at 0| for the same prompt and seed, over the mean difference between the
    seeds at 0 (seed noise); 0 = the adapter changes nothing."""
    s = list(strengths)
    at = {w: [[np.asarray(im, dtype=np.float32) for im in row] for row in images[s.index(w)]] for w in (0.0, 1.0)}
    moved = np.mean([np.abs(a - b).mean() for ra, rb in zip(at[1.0], at[0.0]) for a, b in zip(ra, rb)])
    pairs = [np.abs(row[i] - row[j]).mean() for row in at[0.0] for i in range(len(row)) for j in range(i + 1, len(row))]
    noise = np.mean(pairs) if pairs else 1.0
    return float(moved / max(noise, 1e-6))


def check_effect(renderer, adapter: str | Path, reference: Sequence[str | Path], prompts: Sequence[str],
                 out_dir: str | Path, *, clip_model: str | None = None, strengths=STRENGTHS, seeds=SEEDS,
                 size: int | None = None, steps: int = 20, guidance: float = 7.0, text_encoding: dict | None = None,
                 should_stop: Callable[[], bool] | None = None) -> EffectResult:
    """Render, score, decide; write effect.json and effect.png into ``out_dir``. Raises on failure (see ``run``)."""
    from .score import make_scorer

    scorer = make_scorer(reference_images(reference), clip_model)
    images = render_strengths(renderer, adapter, prompts, strengths=strengths, seeds=seeds, size=size, steps=steps,
                              guidance=guidance, text_encoding=text_encoding, should_stop=should_stop)
    renderer.set_strengths({str(adapter): 0.0})
    flat = [im for row in images for per_prompt in row for im in per_prompt]
    scores = np.asarray(scorer.scores(flat), dtype=np.float64).reshape(len(strengths), len(prompts), len(seeds))
    change = pixel_change(images, strengths)
    reason, spread = decide(scores, change, strengths)
    means = [round(float(m), 4) for m in scores.mean(axis=(1, 2))]
    result = EffectResult(verdict=VERDICT_OF[reason], reason=reason, advice=ADVICE[reason], prompts=list(prompts),
                          seeds=list(seeds), strengths=[float(w) for w in strengths], scores=means,
                          base_score=means[list(strengths).index(0.0)], dataset_score=round(scorer.dataset_score, 4),
                          spread=round(spread, 4), change=round(change, 3), scorer=scorer.name, adapter=str(adapter))
    from .effect_grid import write_grid

    result.grid = str(write_grid(Path(out_dir) / EFFECT_PNG, images, scores, strengths, seeds, prompts))
    write_result(out_dir, result)
    return result


def write_result(out_dir: str | Path, result: EffectResult) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / EFFECT_JSON, json.dumps(result.to_dict(), indent=1) + "\n")


def read_result(run_dir: str | Path) -> dict | None:
    """A run's effect.json as a dict, None when absent or unreadable."""
    try:
        data = json.loads((Path(run_dir) / EFFECT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("verdict") in VERDICTS else None


def run(renderer_factory: Callable[[], object], adapter: str | Path, reference: Sequence[str | Path],
        prompts: Sequence[str], out_dir: str | Path, *, log: Callable[[str], None] = lambda m: None,
        **kwargs) -> EffectResult:
    """``check_effect`` that never raises: a failure is logged (with the traceback's tail) and recorded as
    verdict ``unknown`` in effect.json; the adapter is never touched. ``renderer_factory`` is called inside."""
    try:
        return check_effect(renderer_factory(), adapter, reference, prompts, out_dir, **kwargs)
    except Exception as err:  # noqa: BLE001 - the check is advice; the adapter is already saved
        message = str(err) if isinstance(err, TrainerError) else f"{type(err).__name__}: {err}"
        if not isinstance(err, TrainerError):
            for line in traceback.format_exc().rstrip().splitlines()[-6:]:
                log(f"effect check: {line}")
        log(f"effect check failed: {message}")
        result = EffectResult(verdict="unknown", reason="unknown", advice=ADVICE["unknown"], prompts=list(prompts),
                              seeds=list(kwargs.get("seeds", SEEDS)),
                              strengths=[float(w) for w in kwargs.get("strengths", STRENGTHS)],
                              adapter=str(adapter), error=message)
        try:
            write_result(out_dir, result)
        except OSError as write_err:
            log(f"effect check: cannot write {Path(out_dir) / EFFECT_JSON} ({write_err})")
        return result


def run_config(adapter: str | Path) -> dict:
    """The config.json of the run folder an adapter lies in ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(adapter).parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_adapter(renderer_factory: Callable[[], object], adapter: str | Path, data_dir: str | Path, *,
                  trigger_word: str = "", out_dir: str | Path | None = None, resolution: int = 0,
                  text_encoding: dict | None = None, clip_model: str | None = None, caption_extension: str = ".txt",
                  log: Callable[[str], None] = lambda m: None) -> EffectResult:
    """The check on demand for any adapter file against the images in ``data_dir`` (the CLI's `effect`, the
    Preview tab). Results go to ``out_dir`` (default: the adapter's folder). A missing file or dataset is a
    TrainerError; a failure while rendering or scoring gives verdict ``unknown`` (logged), as after training.
    ``renderer_factory`` (a loaded ``Renderer``, or the call that loads one) is called once the inputs are fine."""
    from ..data.scan import scan_dataset

    adapter = Path(adapter)
    if not adapter.is_file():
        raise TrainerError(f"LoRA file '{adapter}' does not exist; check the path.", field="lora")
    if not data_dir or not Path(data_dir).is_dir():
        raise TrainerError(f"Dataset folder '{data_dir}' does not exist; give the folder of images the adapter was "
                           "trained on (--data).", field="data_dir")
    report = scan_dataset(data_dir, trigger_word=trigger_word, resolution=0, caption_extension=caption_extension)
    if not report.items:
        raise TrainerError(f"Dataset folder '{data_dir}' has no readable images to compare with; give the folder "
                           "the adapter was trained on.", field="data_dir")
    prompts = effect_prompts([item.caption for item in report.items], trigger_word)
    return run(renderer_factory, adapter, [item.path for item in report.items], prompts, out_dir or adapter.parent,
               log=log, clip_model=clip_model or None, size=resolution or None, steps=CHECK_STEPS,
               text_encoding=text_encoding)
