"""Run folders under the outputs folder and the dataset inside each: uploads, .zip and folder imports,
captions, bulk caption edits, the dataset report and a model's native training size.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterable

from trainer import config as tconfig
from trainer.errors import ConfigError, TrainerError
from trainer.fileio import atomic_write_text

from app.runner import read_status
from app.sandbox import Sandbox
from app.scheduler import JobQueue
from app.uploads import IMAGE_EXTENSIONS, Limits
from app.uploads import add_files as add_uploads
# = trainer.models.builtin.BUILTIN_DIR, without importing it (diffusers)
BUILTIN_MODEL_DIR = Path(tconfig.__file__).resolve().parent / "assets" / "builtin"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RunsMixin:
    """Run folders and datasets. State: ``outputs`` (the folder holding every run), ``jobs`` (the running job
    names the default run; with the queue, each run's state), ``default_model`` and ``_renderers`` (a loaded
    model already knows its size), ``sandbox`` (the folders imports and models may come from) and ``limits``
    (upload sizes and counts)."""

    outputs: Path
    jobs: JobQueue
    default_model: str
    sandbox: Sandbox
    limits: Limits
    _renderers: dict[str, Any]
    _record: Any                       # Service._record: a run's record snapshot

    def run_dir(self, run: str) -> Path:
        run = (run or "").strip()
        if not RUN_NAME.match(run) or run.startswith("_"):
            raise TrainerError(f"Run name {run!r} is not usable; use letters, digits, '-', '_' or '.' "
                               "(e.g. my-lora).", field="run")
        return self.outputs / run

    def runs(self) -> list[str]:
        """Run folders, most recently changed first."""
        dirs = [p for p in self.outputs.iterdir() if p.is_dir() and p.name[0] not in "._"]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def default_run(self) -> str:
        snap = self.jobs.snapshot()
        if snap.run and snap.state != "idle":
            return snap.run
        return next(iter(self.runs()), "my-lora")

    def run_choices(self) -> list[tuple[str, str]]:
        """(label, run) per run folder for the picker, the label saying its state: "my-lora — training 120/300",
        "— queued, 1 ahead", "— interrupted at 80", "— stopped at 120", "— finished"."""
        overview = self.jobs.overview()
        out = []
        for name in self.runs():
            state = self.run_state(name, overview)
            out.append((f"{name} — {state}" if state else name, name))
        return out

    def run_state(self, run: str, overview: Any = None) -> str:
        """The state part of ``run``'s picker label ("" for a run that never trained)."""
        overview = overview or self.jobs.overview()
        cur = overview.current
        if cur.run == run and cur.active:
            return f"{'training' if cur.state == 'running' else cur.state} {cur.step}/{cur.total_steps or '?'}"
        ahead = overview.ahead(run)
        if ahead is not None:
            return f"queued, {ahead} ahead"
        status = read_status(self.run_dir(run))
        if status is None:
            own = self.jobs.last(run)
            return own.state if own is not None and own.state != "idle" else ""
        state, step, total = status.get("state"), status.get("step") or 0, status.get("total_steps") or "?"
        if state == "running":
            return f"training {step}/{total}"
        if state == "interrupted":   # status.json's step may trail the last step of events.jsonl by a second
            record = self._record(run)
            return f"interrupted at {record.step if record is not None else step}"
        verdict = (self.run_effect(run) or {}).get("verdict")
        text = f"{state} at {step}" if state in ("stopped", "failed") else str(state)
        return f"{text} · effect: {verdict}" if verdict and state in ("finished", "stopped") else text

    def run_effect(self, run: str) -> dict[str, Any] | None:
        """The run's effect check (<run>/effect.json: verdict, scores, advice...), None when it has none."""
        from trainer.render.effect import read_result

        return read_result(self.run_dir(run))

    # -- dataset ----------------------------------------------------------------------------
    def dataset_dir(self, run: str) -> Path:
        return self.run_dir(run) / "dataset"

    def add_files(self, run: str, paths: Iterable[str | Path]) -> str:
        """Copy uploaded images / same-stem .txt captions / .zip archives into the run's dataset, within
        ``limits`` (app/uploads.py: sizes and counts checked first, taken names get a -N suffix). Images that
        cannot be decoded and other files are not added: the note counts them, and ``rejected_files`` lists
        each with its reason until the list is cleared."""
        from app.dataset_state import image_problem

        done = add_uploads(self.dataset_dir(run), paths, self.limits, len(self.dataset_items(run)), image_problem)
        self.note_rejected(run, done.added, done.rejected)
        return done.note

    def import_folder(self, run: str, folder: str) -> str:
        """Copy a server folder's images and captions (under a data root; links out of it refused)."""
        src = self.sandbox.data_folder(folder)
        files = [self.sandbox.inside(p, src) for p in sorted(src.rglob("*")) if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(src).parts)
            and p.suffix.lower() in IMAGE_EXTENSIONS + (".txt",)]
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            raise TrainerError(f"Folder '{src}' has no images ({', '.join(IMAGE_EXTENSIONS)}).", field="folder")
        return self.add_files(run, files)

    def dataset_items(self, run: str) -> list[tuple[str, str, str]]:
        """(file name, image path, caption) per image, sorted by name."""
        d = self.dataset_dir(run)
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.iterdir(), key=lambda p: p.name.lower()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                cap = p.with_suffix(".txt")
                out.append((p.name, str(p), _read_caption(cap) if cap.is_file() else ""))
        return out

    def _image(self, run: str, name: str) -> Path:
        p = self.dataset_dir(run) / Path(name).name
        if not p.is_file():
            raise TrainerError(f"Image '{name}' is not in the dataset of run '{run}'; reload the page.",
                               field="caption")
        return p

    def set_caption(self, run: str, name: str, caption: str) -> None:
        """Write one caption atomically, as one line (the trainer reads only the first)."""
        atomic_write_text(self._image(run, name).with_suffix(".txt"), " ".join(caption.split()))

    def remove_image(self, run: str, name: str) -> None:
        img = self._image(run, name)
        img.with_suffix(".txt").unlink(missing_ok=True)
        img.unlink()

    def bulk_prefix(self, run: str, word: str) -> int:
        """Put ``word`` first in every caption that does not start with it; returns captions changed."""
        from trainer.data.scan import apply_trigger

        if not word.strip().strip(",").strip():
            raise TrainerError("The trigger word is empty; type one (e.g. 'zkw') first.", field="trigger_word")
        changed = 0
        for name, _, caption in self.dataset_items(run):
            new = apply_trigger(caption, word)
            if new != caption:
                self.set_caption(run, name, new)
                changed += 1
        return changed

    def bulk_replace(self, run: str, find: str, replace: str) -> int:
        if not find:
            raise TrainerError("'Find' is empty; type the text to replace.", field="find")
        changed = 0
        for name, _, caption in self.dataset_items(run):
            if find in caption:
                self.set_caption(run, name, re.sub(r"\s+", " ", caption.replace(find, replace)))
                changed += 1
        return changed

    def bulk_clear(self, run: str) -> int:
        d, n = self.dataset_dir(run), 0
        for name, _, _ in self.dataset_items(run):
            cap = (d / name).with_suffix(".txt")
            if cap.exists():
                cap.unlink()
                n += 1
        return n

    def dataset_report(self, run: str, trigger_word: str = "", resolution: int = 0, model: str = "",
                       caption_extension: str = ".txt") -> dict[str, Any]:
        """The trainer's dataset report (sizes checked against ``resolution``, 0 = the model's native size;
        captions read from ``caption_extension`` files, as training reads them) plus a count warning;
        ``text`` is ready to show."""
        d = self.dataset_dir(run)
        if not d.is_dir() or not self.dataset_items(run):
            return {"num_images": 0, "text": "No images yet. Drop 30-50 images (and their .txt captions, or a "
                    ".zip) above, or import a folder from the server.", "warnings": []}
        from trainer.data.scan import scan_dataset

        report = scan_dataset(str(d), trigger_word=trigger_word, resolution=resolution or self.native_resolution(model),
                              caption_extension=_caption_extension(caption_extension))
        from trainer.data.buckets import add_bucket_table, bucket_spec

        add_bucket_table(report, bucket_spec(report.resolution))   # where each image trains (default buckets)
        data = report.to_dict()
        n = report.num_images
        warnings = list(report.warnings)
        if not 30 <= n <= 50 and not any("30-50" in w for w in warnings):
            warnings.insert(0, f"{n} image(s): 30-50 varied images usually give the best LoRA; "
                               "you can still train with this many.")
        data.update(text=report.summary(), warnings=warnings, num_images=n)
        return data

    def preview_captions(self, run: str, shuffle_tags: bool, keep_tokens: int, tag_dropout: float, seed: int = 0,
                         *, trigger_word: str = "", caption_extension: str = ".txt",
                         count: int = 3) -> list[tuple[str, str, str]]:
        """(file name, caption as written with the trigger word, caption one training sample sees) for the first
        ``count`` images, each drawn from its own RNG seeded by (seed, index) with the tag shuffle/dropout of
        trainer.data.captions. TrainerError for invalid settings, or (``check_keep_tokens``, the check training
        makes) a keep_tokens larger than some caption's tag count."""
        from trainer.data.captions import check_keep_tokens, transform_caption
        from trainer.data.scan import scan_dataset

        settings = {"shuffle_tags": shuffle_tags, "keep_tokens": keep_tokens, "tag_dropout": tag_dropout}
        config = tconfig.from_dict(settings)
        errors = {k: msg for k, msg in config.validate().items() if k in settings}
        if errors:
            raise ConfigError(errors)
        if not self.dataset_items(run):
            raise TrainerError(f"Run '{run}' has no images yet; add some above first.", field="data_dir")
        report = scan_dataset(self.dataset_dir(run), trigger_word=trigger_word, resolution=0,
                              caption_extension=_caption_extension(caption_extension))
        captions = {item.path.relative_to(report.data_dir).as_posix(): item.caption for item in report.items}
        tools = {"shuffle_tags": config.shuffle_tags, "tag_dropout": config.tag_dropout}
        check_keep_tokens(captions, config.keep_tokens, **tools)
        return [(name, caption, transform_caption(caption, random.Random(f"{seed}:{index}"),
                                                  keep_tokens=config.keep_tokens, **tools))
                for index, (name, caption) in enumerate(list(captions.items())[:count])]

    def native_resolution(self, model: str = "") -> int:
        """The training size a model uses when ``resolution`` is 0 (512 when unknown without loading it)."""
        model = (model or self.default_model).strip()
        if model in self._renderers:
            return int(self._renderers[model].renderer.base.resolution)
        # trainer.models.loader knows this too, but importing it (diffusers) takes many seconds; its configs
        # ship as package data, so read them directly.
        if model != "builtin":
            try:
                self.sandbox.model(model)        # read nothing outside the model roots
            except TrainerError:
                return 1024 if "xl" in model.lower() else 512
        folder = BUILTIN_MODEL_DIR if model == "builtin" else Path(model).expanduser()
        try:  # a diffusers folder: UNet latent size x VAE downscale, as the pipelines compute it
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return 1024 if "xl" in model.lower() else 512


def _caption_extension(ext: str) -> str:
    """``ext`` when it is a valid ``TrainConfig.caption_extension``, else ConfigError naming it."""
    errors = tconfig.TrainConfig(caption_extension=(ext or "").strip()).validate()
    if "caption_extension" in errors:
        raise ConfigError({"caption_extension": errors["caption_extension"]})
    return ext.strip()


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()
