"""What the Dataset tab keeps in a run folder besides the images: its settings as typed (trigger word, import
folder, captioning model: ``dataset-settings.json``), the files an upload did not add and why
(``rejected.json``), and which images in the dataset cannot be decoded (checked once per file version).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError
from trainer.fileio import atomic_write_text

SETTINGS_FILE = "dataset-settings.json"
REJECTED_FILE = "rejected.json"
DATASET_SETTINGS = ("trigger_word", "import_folder", "caption_model")    # the tab's boxes kept per run
REJECTED_LIMIT = 200


def image_problem(source: Any) -> str | None:
    """Why ``source`` (a path or a binary file object) cannot be decoded as training decodes it, or None."""
    from trainer.data.images import DECODE_ERRORS, decode_reason, read_rgb

    try:
        read_rgb(source)
    except DECODE_ERRORS as err:
        return decode_reason(err)
    return None


class DatasetStateMixin:
    """Per-run dataset settings, the rejected-files list and the unreadable-image check. Uses ``run_dir``,
    ``dataset_dir`` and ``dataset_items`` (RunsMixin)."""

    _decode_cache: dict[tuple[str, int, int], str | None]

    # -- settings as typed -------------------------------------------------------------------
    def dataset_settings(self, run: str) -> dict[str, str]:
        """The run's Dataset-tab settings; a run trained before they were kept takes its trigger word from the
        config.json of its last training."""
        run_dir = self.run_dir(run)
        saved = _read_json(run_dir / SETTINGS_FILE, {})
        values = {k: str(saved[k]) for k in DATASET_SETTINGS if isinstance(saved, dict) and k in saved}
        if "trigger_word" not in values:
            config = _read_json(run_dir / "config.json", {})
            if isinstance(config, dict) and config.get("trigger_word"):
                values["trigger_word"] = str(config["trigger_word"])
        return values

    def save_dataset_setting(self, run: str, key: str, value: str) -> None:
        """Keep one Dataset-tab setting with the run, as typed (the run folder is made if needed)."""
        if key not in DATASET_SETTINGS:
            raise TrainerError(f"'{key}' is not a dataset setting; use one of {', '.join(DATASET_SETTINGS)}.",
                               field=key)
        run_dir = self.run_dir(run)
        saved = _read_json(run_dir / SETTINGS_FILE, {})
        saved = saved if isinstance(saved, dict) else {}
        if saved.get(key, "") == (value or ""):    # unchanged (an empty box on a page just opened makes no folder)
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        saved[key] = value or ""
        atomic_write_text(run_dir / SETTINGS_FILE, json.dumps(saved, indent=1) + "\n")

    # -- files an upload did not add ---------------------------------------------------------
    def rejected_files(self, run: str) -> list[tuple[str, str]]:
        """(file name, why it was not added), oldest first, kept until cleared or the file is added."""
        data = _read_json(self.run_dir(run) / REJECTED_FILE, [])
        return [(str(r[0]), str(r[1])) for r in data if isinstance(r, list) and len(r) == 2] \
            if isinstance(data, list) else []

    def note_rejected(self, run: str, added: list[str], rejected: list[tuple[str, str]]) -> None:
        """After an upload: add what it rejected (newest reason per name) and drop the names it added."""
        if not added and not rejected:
            return
        fresh = {name for name, _ in rejected} | set(added)
        kept = [r for r in self.rejected_files(run) if r[0] not in fresh] + list(rejected)
        self._write_rejected(run, kept[-REJECTED_LIMIT:])

    def clear_rejected(self, run: str) -> None:
        self._write_rejected(run, [])

    def _write_rejected(self, run: str, rows: list[tuple[str, str]]) -> None:
        path = self.run_dir(run) / REJECTED_FILE
        if not rows:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps([list(r) for r in rows], indent=1) + "\n")

    # -- images that cannot be decoded -------------------------------------------------------
    def unreadable_images(self, run: str) -> dict[str, str]:
        """{file name: reason} for the dataset's images that training could not decode."""
        if not hasattr(self, "_decode_cache"):
            self._decode_cache = {}
        out = {}
        for name, path, _ in self.dataset_items(run):
            try:
                st = Path(path).stat()
            except OSError:
                continue
            key = (path, st.st_mtime_ns, st.st_size)
            if key not in self._decode_cache:
                self._decode_cache[key] = image_problem(path)
            if self._decode_cache[key]:
                out[name] = self._decode_cache[key]
        return out

    def remove_unreadable(self, run: str) -> list[str]:
        """Delete the images that cannot be decoded (and their captions); returns their names."""
        names = sorted(self.unreadable_images(run))
        for name in names:
            self.remove_image(run, name)
        return names

    def refuse_unreadable(self, run: str) -> None:
        """TrainerError naming the dataset's undecodable images: training would stop on them."""
        bad = self.unreadable_images(run)
        if bad:
            listed = "; ".join(f"{n} ({why})" for n, why in list(bad.items())[:5]) + (" ..." if len(bad) > 5 else "")
            raise TrainerError(f"Not started: {len(bad)} file(s) in the dataset of run '{run}' cannot be read and "
                               f"would stop training: {listed}. Open the 1. Dataset tab and press 'Remove "
                               "unreadable files' (or re-save them as PNG/JPEG), then start again.",
                               field="data_dir")


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
