"""Adapters and export: the adapters under the outputs folder, uploaded ones, their metadata and the prompt
to try them with, the file to download (kohya as is, a portable copy, or a diffusers/PEFT copy), what a file
holds (inspect), a copy in the other layout (convert) and a base model with an adapter baked in (outputs/_baked).
"""
from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError

from app.uploads import free_name

BAKE_FORMATS = ("file", "folder")       # one .safetensors checkpoint (A1111, ComfyUI) | a diffusers folder
CONVERT_TARGETS = ("kohya", "peft")


@dataclass(frozen=True)
class Written:
    """A file or folder a tool wrote, and the trainer's summary of it."""

    path: str
    summary: str


class ExportMixin:
    """Adapters and export. State: ``outputs`` (adapters are found there; uploads go to outputs/_imported),
    ``default_model`` and ``_render_lock``; a diffusers copy attaches the adapter through ``_renderer``
    (RenderMixin), so its base model is loaded once."""

    outputs: Path
    default_model: str
    _render_lock: threading.Lock
    sandbox: Any                     # app.sandbox.Sandbox: adapters are opened only under the outputs folder
    limits: Any                      # app.uploads.Limits: the upload size limit

    def adapters(self) -> list[tuple[str, str]]:
        """(label, path) of every adapter under the outputs folder, newest first."""
        found = [p for p in self.outputs.rglob("*.safetensors")
                 if not {"dataset", "_baked"} & set(p.relative_to(self.outputs).parts) and not p.name.startswith(".")
                 and not p.stem.endswith("-diffusers")]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [(str(p.relative_to(self.outputs)), str(p)) for p in found]

    def import_adapter(self, upload: str | Path) -> str:
        """Check an uploaded .safetensors is a LoRA, keep a copy under outputs/_imported; returns its path."""
        from trainer.files.adapters import read_lora_file

        src = Path(upload)
        if src.suffix.lower() != ".safetensors":
            raise TrainerError(f"'{src.name}' is not a .safetensors file; upload a LoRA saved as .safetensors "
                               "(convert .ckpt/.pt/.bin files first).", field="adapter")
        if not src.is_file():
            raise TrainerError(f"Upload '{src.name}' did not arrive; upload it again.", field="adapter")
        self.limits.check_size(src.name, src.stat().st_size)
        folder = self.outputs / "_imported"
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / free_name(folder, src.name)       # an earlier upload of the same name is kept
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
        return self.sandbox.adapter(path)         # an existing file under the outputs folder

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
        cfg = _run_config(path)
        prompts = cfg.get("sample_prompts") or []
        return prompts[0] if prompts else str(cfg.get("trigger_word", ""))

    def adapter_text_encoding(self, path: str) -> dict[str, int]:
        """How its run encoded captions, to render prompts the same way: ``clip_skip`` and ``max_token_length``
        from the run's config.json (0 and 75, the TrainConfig defaults, when there is none or it is unreadable)."""
        cfg, out = _run_config(path), {"clip_skip": 0, "max_token_length": 75}
        for key in out:
            try:
                out[key] = int(cfg.get(key, out[key]))
            except (TypeError, ValueError):
                pass
        return out

    # -- export -----------------------------------------------------------------------------
    def adapter_model(self, path: str) -> str:
        """The base model an adapter was trained on here (its run's config.json), else the default."""
        return str(_run_config(path).get("model") or self.default_model)

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

    # -- inspect, convert, bake -------------------------------------------------------------
    def inspect(self, path: str) -> str:
        """What the file holds (format, architecture, modules per group, metadata, warnings), as text."""
        from trainer.files.inspect import inspect_file

        return inspect_file(self._adapter(path)).summary()

    def convert(self, path: str, to: str) -> Written:
        """A copy in the ``to`` layout ("kohya" or "peft"), written beside the file as ``<stem>-<to>``."""
        from trainer.files.convert import convert_file

        if to not in CONVERT_TARGETS:
            raise TrainerError(f"Convert target {to!r} is not one of {', '.join(CONVERT_TARGETS)}.", field="convert")
        p = self._adapter(path)
        result = convert_file(p, p.with_name(f"{p.stem}-{to}.safetensors"), to=to)
        return Written(str(result.path), result.summary())

    def bake(self, path: str, weight: float = 1.0, fmt: str = "file") -> Written:
        """The adapter's run model (``adapter_model``) with the adapter merged in at ``weight``, written under
        outputs/_baked as one .safetensors checkpoint ("file") or a diffusers folder ("folder"). It loads its
        own copy of the model (merging changes weights in place), under the render lock."""
        from trainer.files.bake import bake

        if fmt not in BAKE_FORMATS:
            raise TrainerError(f"Bake format {fmt!r} is not one of {', '.join(BAKE_FORMATS)}.", field="bake")
        p = self._adapter(path)
        stem = f"{p.parent.name}-{p.stem}-x{float(weight):g}" if p.parent != self.outputs else f"{p.stem}-x{weight:g}"
        suffix = ".safetensors" if fmt == "file" else ""
        out, n = self.outputs / "_baked" / f"{stem}{suffix}", 1
        while out.exists():           # never overwrite an earlier bake
            n += 1
            out = out.with_name(f"{stem}-{n}{suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with self._render_lock:
            result = bake(self.adapter_model(path), [(str(p), float(weight))], out)
        return Written(str(result.path), result.summary())


def _run_config(path: str | Path) -> dict[str, Any]:
    """The config.json of the run folder an adapter sits in; {} for adapters from elsewhere (uploads, blends)."""
    try:
        cfg = json.loads((Path(path).parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}
