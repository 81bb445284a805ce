"""Presets: partial TrainConfig overlays. The shipped ones are package data (trainer/presets/*.toml, read through
importlib.resources); a user's own live in a folder of theirs (the web UI: <outputs>/presets or --presets-dir) and
are never written into the package. ``trainer.config`` re-exports these functions.
"""
from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import TrainerError

BUILTIN_PRESETS = resources.files(__package__).joinpath("presets")
PRESETS_DIR = Path(str(BUILTIN_PRESETS))
PRESET_SUFFIXES = (".toml", ".json")


def _preset_files(directory: Path | None = None) -> dict[str, Any]:
    """name -> file (a Path or an importlib.resources Traversable): the shipped presets, then ``directory``'s
    (a user preset of the same name wins)."""
    found: dict[str, Any] = {}
    sources = [BUILTIN_PRESETS] + ([Path(directory)] if directory and Path(directory).is_dir() else [])
    for source in sources:
        for entry in sorted(source.iterdir(), key=lambda e: e.name):
            stem, dot, ext = entry.name.rpartition(".")
            if dot and f".{ext}" in PRESET_SUFFIXES and entry.is_file() and not stem.startswith("."):
                found[stem] = entry
    return found


def list_presets(directory: Path | None = None) -> dict[str, str]:
    """Preset name -> one-line description: the shipped presets and those in ``directory``."""
    return {name: str(_read_preset_file(p).get("description", "")) for name, p in _preset_files(directory).items()}


def _read_preset_file(path: Any) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.name.endswith(".toml") else json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise TrainerError(f"Preset file '{path}' cannot be read ({err}); fix or delete it.",
                           field="preset") from None
    if not isinstance(data, dict):
        raise TrainerError(f"Preset file '{path}' holds {type(data).__name__}, not a table of settings; fix or "
                           "delete it.", field="preset")
    return data


def check_preset_name(name: str) -> str:
    """``name`` when it is a bare preset name (no folder, no extension), else TrainerError."""
    if not name.strip() or any(c in name for c in '/\\:*?"<>|. ') or name.startswith(("-", "_")):
        raise TrainerError(f"Preset name {name!r} is not usable; use letters, digits, '-' or '_' (no folders).",
                           field="preset")
    return name


def load_preset(name_or_path: str, directory: Path | None = None, *, allow_path: bool = True) -> dict[str, Any]:
    """Return a preset's overlay dict (without its description): a preset name (shipped or in ``directory``), or
    with ``allow_path`` (the CLI) a preset file."""
    presets = _preset_files(directory)
    if name_or_path in presets:
        p = presets[name_or_path]
    elif allow_path and Path(name_or_path).is_file():
        p = Path(name_or_path)
    else:
        names = ", ".join(presets) or "none"
        raise TrainerError(f"Preset '{name_or_path}' not found; available presets: {names}.", field="preset")
    data = _read_preset_file(p)
    data.pop("description", None)
    return data


def save_preset(config: Any, name: str, description: str = "", directory: Path | None = None) -> Path:
    """Save the fields of ``config`` (a TrainConfig) that differ from the defaults as a JSON preset in ``directory``
    (a user's folder; the shipped presets are never written)."""
    from .fileio import atomic_write_text
    check_preset_name(name)
    if directory is None or Path(directory).resolve() == PRESETS_DIR.resolve():
        raise TrainerError(f"Presets are not saved into the package ({directory or 'no folder given'}); give a "
                           "folder of your own (the web UI uses <outputs>/presets or --presets-dir).", field="preset")
    defaults = type(config)().to_dict()
    skip = {"data_dir", "output_dir", "name", "version"}
    overlay = {k: v for k, v in config.to_dict().items() if k not in skip and v != defaults[k]}
    Path(directory).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(directory) / f"{name}.json",
                             json.dumps({"description": description, **overlay}, indent=2) + "\n")
