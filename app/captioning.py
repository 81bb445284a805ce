"""Auto-captioning a run's dataset for the web UI: the captioning model named on the Dataset tab, loaded once and
kept, writes the captions the editor shows (trainer/data/autocaption.py does the work)."""
from __future__ import annotations

import threading
from typing import Any, Callable


class CaptionMixin:
    """``caption_dataset``; uses ``dataset_dir`` (RunsMixin). State: ``_captioners`` (model folder -> captioner,
    the last one only: a model can be large) and the lock that keeps two pages from loading it at once."""

    _captioners: dict[str, Any]
    _caption_lock: threading.Lock

    def caption_dataset(self, run: str, model: str, *, overwrite: bool = False, prefix: str = "",
                        caption_extension: str = ".txt",
                        progress: Callable[[int, int], None] | None = None) -> str:
        """Caption the run's images without a caption (every image with ``overwrite``), ``prefix`` first; the
        note says what was written and kept."""
        from trainer.data.autocaption import caption_folder, load_captioner

        from app.runs import _caption_extension

        ext = _caption_extension(caption_extension or ".txt")
        if not hasattr(self, "_caption_lock"):
            self._captioners, self._caption_lock = {}, threading.Lock()
        with self._caption_lock:
            key = (model or "").strip()
            captioner = self._captioners.get(key)
            if captioner is None:
                self._captioners.clear()
                captioner = self._captioners[key] = load_captioner(key)
            result = caption_folder(self.dataset_dir(run), captioner, overwrite=overwrite, prefix=prefix,
                                    caption_extension=ext, progress=progress)
        return result.summary()
