"""Preview and blend: cached renderers, one per base model and at most ``max_models`` of them (least recently
used evicted and freed; adapters attach to a renderer, so changing a strength never reloads the model),
before/after comparisons, strength sweeps, and saving blends.
"""
from __future__ import annotations

import gc
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from trainer.errors import TrainerError

from app.runs import RUN_NAME

MAX_MODELS = 2          # base models kept loaded for preview/export (each is GBs for SD1.5/SDXL)


@dataclass
class _Cached:
    renderer: Any
    mtimes: dict[str, float] = field(default_factory=dict)   # attached adapter -> file mtime when attached


class RenderMixin:
    """Cached renderers. State: ``_renderers`` (base model -> _Cached), ``_renderer_factory`` (None = the
    trainer's Renderer), ``_render_lock`` (one render at a time), ``model_loads`` (models loaded so far),
    ``default_model`` and ``outputs`` (blends go to outputs/_blends); ``_adapter`` (ExportMixin) checks paths,
    ``adapter_text_encoding`` (ExportMixin) reads a run's clip skip and token length and ``adapter_model`` its
    base model."""

    _renderers: OrderedDict[str, _Cached]
    _renderer_factory: Callable[[str], Any] | None
    _render_lock: threading.Lock
    model_loads: int
    max_models: int
    default_model: str
    outputs: Path
    sandbox: Any                         # app.sandbox.Sandbox: which models the UI may load

    def _renderer(self, model: str) -> _Cached:
        """The renderer of ``model`` (loaded on first use; the caller holds ``_render_lock``). Loading one more
        than ``max_models`` first evicts the least recently used one and frees its memory."""
        model = (model or self.default_model).strip()
        if model in self._renderers:
            self._renderers.move_to_end(model)
            return self._renderers[model]
        self.sandbox.model(model)
        while len(self._renderers) >= self.max_models:
            self._evict(next(iter(self._renderers)))
        if self._renderer_factory is not None:
            renderer = self._renderer_factory(model)
        else:
            from trainer.render.generate import Renderer
            renderer = Renderer.load(model)
        self.model_loads += 1
        self._renderers[model] = _Cached(renderer)
        return self._renderers[model]

    def _evict(self, model: str) -> None:
        """Drop one cached renderer and give its memory back (Python objects now, CUDA's cache too)."""
        cached = self._renderers.pop(model)
        del cached
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def loaded_models(self) -> list[str]:
        """The base models loaded for preview, least recently used first."""
        return list(self._renderers)

    def render(self, model: str, loras: dict[str, float], prompt: str, negative_prompt: str = "",
               seed: int = 0, steps: int = 20, guidance: float = 7.0, size: int | None = None):
        """One image (PIL) with each adapter at its weight; a changed adapter file is re-attached. The prompt
        is encoded as the first adapter's run encoded its captions (clip skip, token length)."""
        from trainer.render.generate import RenderSettings

        if not str(prompt).strip():
            raise TrainerError("The prompt is empty; describe the image to render.", field="prompt")
        text = self.adapter_text_encoding(next(iter(loras))) if loras else {}
        settings = RenderSettings(prompt=prompt, negative_prompt=negative_prompt or "", seed=int(seed),
                                  steps=int(steps), guidance=float(guidance), size=int(size) if size else None,
                                  **text)
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

    def check_effect(self, model: str, adapter: str, data_dir: str = "") -> dict[str, Any]:
        """The "did it learn?" check for any adapter (trainer.render.effect): renders at strengths 0-1.5 against
        ``data_dir`` (default: its run's dataset) on ``model`` (default: its run's base model). Returns effect.json's
        fields plus ``line``; the files go beside the adapter (its run's effect.json for a run's final adapter, else
        ``<stem>-effect/``)."""
        from trainer.render import effect

        path = self._adapter(adapter)
        cfg = effect.run_config(path)
        data = (data_dir or "").strip() or cfg.get("data_dir") or ""
        if not data:
            raise TrainerError(f"No training images known for '{path.name}' (it was not trained here); give the "
                               "folder of images it was trained on.", field="effect_data")
        out = path.parent if path.stem == cfg.get("name") else path.parent / f"{path.stem}-effect"
        text = self.adapter_text_encoding(str(path))
        with self._render_lock:
            cached = self._renderer((model or "").strip() or cfg.get("model") or self.default_model)
            mtime = path.stat().st_mtime
            if cached.mtimes.get(str(path), mtime) != mtime:
                cached.renderer.detach(path)
            cached.mtimes[str(path)] = mtime
            result = effect.check_adapter(lambda: cached.renderer, path, data, out_dir=out, text_encoding=text,
                                          trigger_word=str(cfg.get("trigger_word") or ""),
                                          resolution=int(cfg.get("resolution") or 0),
                                          clip_model=cfg.get("clip_model") or None,
                                          caption_extension=cfg.get("caption_extension") or ".txt")
        return {**result.to_dict(), "line": result.line()}

    def save_blend(self, pairs: list[tuple[str, float]], name: str, rank: int | float | None = 0) -> tuple[str, str]:
        """Blend the weighted adapters into outputs/_blends/<name>.safetensors: exactly (``rank`` 0 or None: ranks
        add up) or compacted to ``rank`` by truncated SVD. Returns (path, the fit summary: overall error and the
        worst modules)."""
        from trainer.files.blend import blend

        name = name.strip().removesuffix(".safetensors")
        if not RUN_NAME.match(name):
            raise TrainerError(f"Blend name {name!r} is not usable; use letters, digits, '-' or '_'.",
                               field="blend_name")
        if len(pairs) < 2:
            raise TrainerError("Pick at least two adapters to blend.", field="blend")
        try:
            target = int(rank or 0)
        except (TypeError, ValueError):
            raise TrainerError(f"Compact rank {rank!r} is not a whole number; use 0 for an exact blend.",
                               field="blend_rank") from None
        if target < 0 or target != float(rank or 0):
            raise TrainerError(f"Compact rank {rank!r} must be a whole number >= 0 (0 = exact blend).",
                               field="blend_rank")
        for p, _ in pairs:
            self._adapter(p)
        out = self.outputs / "_blends" / f"{name}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        items = [(p, float(w)) for p, w in pairs]
        if not target:
            report = blend(items, out)
        else:  # a DoRA file is compacted against its base model, which is then loaded: one at a time
            with self._render_lock:
                report = blend(items, out, rank=target, model=self.adapter_model(pairs[0][0]))
        return str(report.path), report.summary()
