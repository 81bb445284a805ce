"""The web UI's one door into ``trainer``: run folders and datasets, the form <-> TrainConfig mapping,
presets, the background training job, cached renderers for preview and blend, and export helpers.

Everything the UI shows comes from here as plain Python values; failures are ``TrainerError``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from trainer import config as tconfig
from trainer.errors import ConfigError, TrainerError
from trainer.events import Control
from trainer.fileio import atomic_write_text

from app.jobs import JobBusy, JobManager, JobSnapshot

__all__ = ["Service", "JobManager", "JobSnapshot", "FieldSpec", "TrainerError", "ConfigError"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANAGED_FIELDS = ("version", "data_dir", "output_dir")     # set by the service, never shown
KEEP_ON_PRESET = ("model", "name", "trigger_word", "sample_prompts")  # a preset without them keeps the user's
TARGET_GROUPS = (  # (label, TrainConfig switch, note); a switch the config lacks is shown as "coming"
    ("UNet cross-attention", "train_unet", "attn2 q/k/v/out: the usual LoRA target"),
    ("Text encoder(s)", "train_text_encoder", "self-attention of CLIP; learns new words faster"),
    ("Projector layers", "train_projector", "encoder_hid_proj / add_embedding / text_projection, the ones the "
     "model has; tools that don't know these modules skip them (Advanced: export_portable leaves them out)"),
)
MAX_ZIP_BYTES = 4 << 30
BUILTIN_MODEL_DIR = Path(tconfig.__file__).resolve().parent / "assets" / "builtin"   # = trainer.models.builtin.BUILTIN_DIR
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --- the settings form ----------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    """One TrainConfig field as a form needs it."""

    name: str
    kind: str                       # bool / int / float / str / choice / list
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""
    section: str = ""


def config_fields() -> list[FieldSpec]:
    """Every user-facing TrainConfig field, in declaration order, with the help, section and choices its
    metadata carries."""
    specs = []
    for f in dataclasses.fields(tconfig.TrainConfig):
        if f.name in MANAGED_FIELDS:
            continue
        default = getattr(tconfig.TrainConfig(), f.name)
        section, help_, choices = tconfig.field_info(f.name)
        kind = ("choice" if choices else "bool" if isinstance(default, bool) else "int" if isinstance(default, int)
                else "float" if isinstance(default, float) else "list" if isinstance(default, list) else "str")
        specs.append(FieldSpec(f.name, kind, default, choices, help_, section))
    return specs


def to_form(config: "tconfig.TrainConfig") -> dict[str, Any]:
    """TrainConfig -> {field: form value}; lists become one item per line."""
    values = config.to_dict()
    return {k: "\n".join(map(str, v)) if isinstance(v, list) else v
            for k, v in values.items() if k not in MANAGED_FIELDS}


def _from_form(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Form values -> (config overlay, per-field conversion errors)."""
    known, errors, overlay = set(tconfig.field_names()), {}, {}
    defaults = tconfig.TrainConfig().to_dict()
    for k, v in values.items():
        if k not in known or k in MANAGED_FIELDS:
            continue
        if v is None or (isinstance(v, str) and not v.strip() and not isinstance(defaults[k], (str, list))):
            errors[k] = "is empty; enter a value."
            continue
        if isinstance(defaults[k], list) and isinstance(v, str):
            v = [line.strip() for line in v.splitlines() if line.strip()]
        try:
            tconfig.from_dict({k: v})
            overlay[k] = v
        except ConfigError as err:
            errors.update(err.errors)
    return overlay, errors


# --- the service ----------------------------------------------------------------------------
@dataclass
class _Cached:
    renderer: Any
    mtimes: dict[str, float] = field(default_factory=dict)   # attached adapter -> file mtime when attached


class Service:
    """All app state that outlives a page: the outputs folder, the job, loaded models."""

    def __init__(self, outputs_dir: str | Path = "outputs", default_model: str = "builtin",
                 presets_dir: str | Path | None = None, train_fn: Callable | None = None,
                 renderer_factory: Callable[[str], Any] | None = None):
        self.outputs = Path(outputs_dir).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.default_model = default_model
        self.presets_dir = Path(presets_dir) if presets_dir else tconfig.PRESETS_DIR
        self.jobs = JobManager(train_fn or _train, Control, user_errors=(TrainerError,))
        self._renderer_factory = renderer_factory
        self._renderers: dict[str, _Cached] = {}
        self._render_lock = threading.Lock()
        self.model_loads = 0

    def warm_up(self) -> None:
        """Import the trainer's heavy modules (torch, diffusers) now, so the first click is not slow.
        Call it from a background thread after the page is up."""
        import trainer.data.scan  # noqa: F401
        import trainer.render.generate  # noqa: F401
        import trainer.loop.train  # noqa: F401

    # -- runs -------------------------------------------------------------------------------
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

    # -- dataset ----------------------------------------------------------------------------
    def dataset_dir(self, run: str) -> Path:
        return self.run_dir(run) / "dataset"

    def add_files(self, run: str, paths: Iterable[str | Path]) -> str:
        """Copy uploaded images / same-stem .txt captions / .zip archives into the run's dataset."""
        dest = self.dataset_dir(run)
        dest.mkdir(parents=True, exist_ok=True)
        images = captions = 0
        skipped: list[str] = []
        for p in map(Path, paths):
            suffix = p.suffix.lower()
            if suffix == ".zip":
                i, c, s = self._unzip(p, dest)
                images, captions, skipped = images + i, captions + c, skipped + s
            elif suffix in IMAGE_EXTENSIONS:
                shutil.copyfile(p, dest / p.name)
                images += 1
            elif suffix == ".txt":
                atomic_write_text(dest / p.name, _read_caption(p))
                captions += 1
            else:
                skipped.append(p.name)
        note = f"Added {images} image(s) and {captions} caption file(s)"
        if skipped:
            shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            note += f"; skipped {len(skipped)} file(s) that are not images, .txt or .zip ({shown})"
        return note + "."

    def import_folder(self, run: str, folder: str) -> str:
        src = Path(folder.strip()).expanduser()
        if not folder.strip() or not src.is_dir():
            raise TrainerError(f"Folder '{folder}' does not exist on the server; give the full path of a folder "
                               "of images (with .txt captions beside them).", field="folder")
        files = [p for p in sorted(src.rglob("*")) if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(src).parts)
            and p.suffix.lower() in IMAGE_EXTENSIONS + (".txt",)]
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            raise TrainerError(f"Folder '{src}' has no images ({', '.join(IMAGE_EXTENSIONS)}).", field="folder")
        return self.add_files(run, files)

    def _unzip(self, archive: Path, dest: Path) -> tuple[int, int, list[str]]:
        """Extract images and captions, flattened to their base names (no paths, links or bombs)."""
        images = captions = 0
        skipped: list[str] = []
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()]
                if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                    raise TrainerError(f"'{archive.name}' unpacks to more than {MAX_ZIP_BYTES >> 30} GB; "
                                       "upload a smaller archive.", field="upload")
                for m in members:
                    name = PurePosixPath(m.filename.replace("\\", "/")).name
                    is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
                    suffix = Path(name).suffix.lower()
                    if (is_link or not name or name.startswith(".") or "__MACOSX" in m.filename
                            or suffix not in IMAGE_EXTENSIONS + (".txt",)):
                        skipped.append(name or m.filename)
                        continue
                    with zf.open(m) as src:
                        data = src.read(m.file_size + 1)
                    if suffix == ".txt":
                        atomic_write_text(dest / name, data.decode("utf-8", errors="replace").strip())
                        captions += 1
                    else:
                        (dest / name).write_bytes(data)
                        images += 1
        except (zipfile.BadZipFile, OSError) as err:
            raise TrainerError(f"'{archive.name}' is not a readable .zip file ({err}); re-create it or upload "
                               "the images directly.", field="upload") from None
        return images, captions, skipped

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

    def dataset_report(self, run: str, trigger_word: str = "", resolution: int = 0,
                       model: str = "") -> dict[str, Any]:
        """The trainer's dataset report (sizes checked against ``resolution``, 0 = the model's native size)
        plus a count warning; ``text`` is ready to show."""
        d = self.dataset_dir(run)
        if not d.is_dir() or not self.dataset_items(run):
            return {"num_images": 0, "text": "No images yet. Drop 30-50 images (and their .txt captions, or a "
                    ".zip) above, or import a folder from the server.", "warnings": []}
        from trainer.data.scan import scan_dataset

        report = scan_dataset(str(d), trigger_word=trigger_word, resolution=resolution or self.native_resolution(model))
        data = report.to_dict()
        n = report.num_images
        warnings = list(report.warnings)
        if not 30 <= n <= 50 and not any("30-50" in w for w in warnings):
            warnings.insert(0, f"{n} image(s): 30-50 varied images usually give the best LoRA; "
                               "you can still train with this many.")
        data.update(text=report.summary(), warnings=warnings, num_images=n)
        return data

    def native_resolution(self, model: str = "") -> int:
        """The training size a model uses when ``resolution`` is 0 (512 when unknown without loading it)."""
        model = (model or self.default_model).strip()
        if model in self._renderers:
            return int(self._renderers[model].renderer.base.resolution)
        # trainer.models.loader knows this too, but importing it (diffusers) takes many seconds; its configs
        # ship as package data, so read them directly.
        folder = BUILTIN_MODEL_DIR if model == "builtin" else Path(model).expanduser()
        try:  # a diffusers folder: UNet latent size x VAE downscale, as the pipelines compute it
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
            return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return 1024 if "xl" in model.lower() else 512

    # -- settings ---------------------------------------------------------------------------
    def fields(self) -> list[FieldSpec]:
        return config_fields()

    def target_groups(self) -> list[tuple[str, str, str, bool]]:
        """(label, config field, note, available) for each group of layers LoRA can train."""
        names = set(tconfig.field_names())
        return [(label, f, note, f in names) for label, f, note in TARGET_GROUPS]

    def default_form(self) -> dict[str, Any]:
        return to_form(tconfig.TrainConfig(model=self.default_model))

    def presets(self) -> dict[str, str]:
        return tconfig.list_presets(self.presets_dir)

    def preset_form(self, name: str, current: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every field as the preset sets it (defaults where it is silent; identity fields kept)."""
        overlay = tconfig.load_preset(name, self.presets_dir)
        values = to_form(tconfig.from_dict(overlay, tconfig.TrainConfig(model=self.default_model)))
        for k in KEEP_ON_PRESET:
            if current and k in current and k not in overlay:
                values[k] = current[k]
        return values

    def validate_form(self, values: dict[str, Any]) -> dict[str, str]:
        """{field: message} for the form as typed (empty when it would train)."""
        overlay, errors = _from_form(values)
        config = tconfig.from_dict(overlay, tconfig.TrainConfig(model=self.default_model))
        errors.update({k: v for k, v in config.validate().items() if k not in errors})
        model = str(config.model).strip()
        if model and model != "builtin" and (model.startswith((".", "/", "~")) or "\\" in model
                                              or model.endswith((".safetensors", ".ckpt"))):
            if not Path(model).expanduser().exists():
                errors.setdefault("model", f"'{model}' does not exist on the server; give the full path of a "
                                           ".safetensors/.ckpt file or a diffusers folder.")
        return errors

    def build_config(self, run: str, values: dict[str, Any]) -> "tconfig.TrainConfig":
        errors = self.validate_form(values)
        if errors:
            raise ConfigError(errors)
        overlay, _ = _from_form(values)
        run_dir = self.run_dir(run)
        overlay.update(data_dir=str(run_dir / "dataset"), output_dir=str(run_dir))
        return tconfig.from_dict(overlay, tconfig.TrainConfig(model=self.default_model)).check()

    def saved_form(self, run: str) -> dict[str, Any] | None:
        """The settings of the run's last training (its config.json), if any."""
        try:
            path = self.run_dir(run) / "config.json"
            return to_form(tconfig.from_dict(json.loads(path.read_text(encoding="utf-8")))) if path.is_file() else None
        except (TrainerError, OSError, ValueError):
            return None

    def save_preset(self, values: dict[str, Any], name: str, description: str = "") -> Path:
        overlay, errors = _from_form(values)
        if errors:
            raise ConfigError(errors)
        config = tconfig.from_dict(overlay)
        return tconfig.save_preset(config, name.strip(), description.strip(), self.presets_dir)

    # -- training ---------------------------------------------------------------------------
    def start_training(self, run: str, values: dict[str, Any]) -> "tconfig.TrainConfig":
        config = self.build_config(run, values)
        if not self.dataset_items(run):
            raise TrainerError(f"Run '{run}' has no images yet; add some on the Dataset tab first.",
                               field="data_dir")
        try:
            self.jobs.start(run, config)
        except JobBusy as err:
            raise TrainerError(str(err), field="start") from None
        return config

    # -- adapters ---------------------------------------------------------------------------
    def adapters(self) -> list[tuple[str, str]]:
        """(label, path) of every adapter under the outputs folder, newest first."""
        found = [p for p in self.outputs.rglob("*.safetensors")
                 if "dataset" not in p.relative_to(self.outputs).parts and not p.name.startswith(".")
                 and not p.stem.endswith("-diffusers")]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [(str(p.relative_to(self.outputs)), str(p)) for p in found]

    def import_adapter(self, upload: str | Path) -> str:
        """Check an uploaded .safetensors is a LoRA, keep a copy under outputs/_imported; returns its path."""
        from trainer.files.adapters import read_lora_file

        src = Path(upload)
        if src.suffix.lower() != ".safetensors":
            raise TrainerError(f"'{src.name}' is not a .safetensors file; upload a LoRA saved as .safetensors.",
                               field="adapter")
        dest = self.outputs / "_imported" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        try:
            read_lora_file(dest)
        except TrainerError:
            dest.unlink(missing_ok=True)
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file reaches the user as a message
            dest.unlink(missing_ok=True)
            raise TrainerError(f"'{src.name}' cannot be read as a LoRA ({type(err).__name__}: {err}).",
                               field="adapter") from None
        return str(dest)

    def _adapter(self, path: str) -> Path:
        p = Path(path or "")
        if not path or not p.is_file():
            raise TrainerError(f"Adapter '{path}' does not exist; pick one from the list or upload one.",
                               field="adapter")
        return p

    def adapter_info(self, path: str) -> dict[str, Any]:
        from trainer.files.adapters import read_lora_file

        p = self._adapter(path)
        lora = read_lora_file(p)
        meta = dict(lora.metadata or {})
        for k, v in list(meta.items()):  # kohya stores nested JSON as strings; show it structured
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    meta[k] = json.loads(v)
                except ValueError:
                    pass
        return {"path": str(p.resolve()), "size_mb": round(p.stat().st_size / 1e6, 3),
                "tensors": len(lora.tensors), "modules": len(lora.modules), "metadata": meta}

    def suggest_prompt(self, path: str) -> str:
        """A prompt to try an adapter with: its run's first sample prompt, else its trigger word."""
        try:
            cfg = json.loads((Path(path).parent / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        prompts = cfg.get("sample_prompts") or []
        return prompts[0] if prompts else str(cfg.get("trigger_word", ""))

    # -- rendering --------------------------------------------------------------------------
    def _renderer(self, model: str) -> _Cached:
        model = (model or self.default_model).strip()
        if model not in self._renderers:
            if self._renderer_factory is not None:
                renderer = self._renderer_factory(model)
            else:
                from trainer.render.generate import Renderer
                renderer = Renderer.load(model)
            self.model_loads += 1
            self._renderers[model] = _Cached(renderer)
        return self._renderers[model]

    def render(self, model: str, loras: dict[str, float], prompt: str, negative_prompt: str = "",
               seed: int = 0, steps: int = 20, guidance: float = 7.0, size: int | None = None):
        """One image (PIL) with each adapter at its weight; a changed adapter file is re-attached."""
        from trainer.render.generate import RenderSettings

        if not str(prompt).strip():
            raise TrainerError("The prompt is empty; describe the image to render.", field="prompt")
        settings = RenderSettings(prompt=prompt, negative_prompt=negative_prompt or "", seed=int(seed),
                                  steps=int(steps), guidance=float(guidance), size=int(size) if size else None)
        with self._render_lock:
            cached = self._renderer(model)
            for path in loras:
                mtime = self._adapter(path).stat().st_mtime
                if cached.mtimes.get(path, mtime) != mtime:
                    cached.renderer.detach(path)
                cached.mtimes[path] = mtime
            return cached.renderer.render(settings, {p: float(w) for p, w in loras.items()})

    def compare(self, model: str, adapter: str, strength: float, **settings: Any):
        """(base image, adapted image) for the same seed."""
        self._adapter(adapter)
        return (self.render(model, {adapter: 0.0}, **settings),
                self.render(model, {adapter: float(strength)}, **settings))

    def sweep(self, model: str, adapter: str, strengths: Iterable[float], **settings: Any):
        """[(image, 'strength s')] for each strength."""
        return [(self.render(model, {adapter: float(s)}, **settings), f"strength {float(s):g}") for s in strengths]

    def save_blend(self, pairs: list[tuple[str, float]], name: str) -> str:
        from trainer.files.adapters import blend_files

        name = name.strip().removesuffix(".safetensors")
        if not RUN_NAME.match(name):
            raise TrainerError(f"Blend name {name!r} is not usable; use letters, digits, '-' or '_'.",
                               field="blend_name")
        if len(pairs) < 2:
            raise TrainerError("Pick at least two adapters to blend.", field="blend")
        for p, _ in pairs:
            self._adapter(p)
        out = self.outputs / "_blends" / f"{name}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        return str(blend_files([(p, float(w)) for p, w in pairs], out))

    # -- export -----------------------------------------------------------------------------
    def adapter_model(self, path: str) -> str:
        """The base model an adapter was trained on here (its run's config.json), else the default."""
        try:
            cfg = json.loads((Path(path).parent / "config.json").read_text(encoding="utf-8"))
            return str(cfg.get("model") or self.default_model)
        except (OSError, ValueError):
            return self.default_model

    def export(self, path: str, fmt: str = "kohya", model: str = "") -> str:
        """The file to download: the adapter itself (kohya/A1111), a portable copy without projector modules
        ("portable"), or a diffusers/PEFT-format copy written beside it (made by attaching the adapter to its
        base model, so that model is loaded once)."""
        p = self._adapter(path)
        if fmt == "kohya":
            return str(p)
        if fmt == "portable":  # the kohya file less its projector modules, for tools that complain about them
            from trainer.files.export import write_portable_copy

            return str(write_portable_copy(p))
        copy = p.with_name(f"{p.stem}-diffusers.safetensors")
        if copy.is_file() and copy.stat().st_mtime >= p.stat().st_mtime:
            return str(copy)
        from trainer.files.export import save_diffusers_format

        with self._render_lock:
            cached = self._renderer(model or self.adapter_model(path))
            mtime = p.stat().st_mtime
            if cached.mtimes.get(str(p), mtime) != mtime:
                cached.renderer.detach(p)
            cached.mtimes[str(p)] = mtime
            name = cached.renderer.attach(p)
            return str(save_diffusers_format(copy, cached.renderer.base.components(), adapter_name=name))


def _train(config: "tconfig.TrainConfig", **kwargs: Any) -> Path:
    from trainer.loop.train import train  # imported on first use: it brings torch and diffusers

    return train(config, **kwargs)


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()
