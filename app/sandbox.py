"""What the web UI may read on the server: the folders a dataset may be imported from, the base models it may load
(paths under the operator's roots; hub ids only with ``--allow-downloads``) and the adapters it may open (under the
outputs folder). Every path is resolved (symlinks followed) before it is compared with a root.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from trainer.errors import TrainerError


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def looks_like_path(model: str) -> bool:
    """A model string meant as a file or folder (not 'builtin', not an ``org/name`` hub id)."""
    return (model.startswith((".", "/", "~")) or "\\" in model or model.endswith((".safetensors", ".ckpt"))
            or Path(model).expanduser().exists())


@dataclass(frozen=True)
class Sandbox:
    """The roots: ``data_roots`` (dataset imports), ``model_roots`` (base-model files and folders), ``outputs``
    (adapters); ``allow_downloads`` lets a hub id be loaded from the UI."""

    outputs: Path
    data_roots: tuple[Path, ...]
    model_roots: tuple[Path, ...]
    allow_downloads: bool = False
    trusted_models: tuple[str, ...] = ()     # what the operator named on the command line (--model)

    @classmethod
    def build(cls, outputs: str | Path, *, listen: bool = False, data_roots: Iterable[str | Path] = (),
              model_roots: Iterable[str | Path] = (), allow_downloads: bool = False,
              trusted_models: Iterable[str] = ()) -> "Sandbox":
        """Roots as given; without any, the home folder and ``outputs`` (loopback) or ``outputs`` alone
        (``listen``: the UI is reachable from other machines)."""
        out = _resolved(outputs)
        default = (out,) if listen else (_resolved(Path.home()), out)
        data = tuple(dict.fromkeys(_resolved(r) for r in data_roots)) or default
        models = tuple(dict.fromkeys(_resolved(r) for r in model_roots)) or default
        return cls(out, data, models, allow_downloads, tuple(m.strip() for m in trusted_models if m))

    def _refuse(self, what: str, given: str, real: Path, roots: tuple[Path, ...], flag: str, field: str):
        via = f" (it resolves to {real})" if str(real) != given.strip() else ""
        shown = ", ".join(str(r) for r in roots)
        raise TrainerError(f"{what} '{given}' is outside the folders this server may read{via}; allowed: {shown}. "
                           f"Move it under one of them, or start the UI with {flag} DIR.", field=field)

    def data_folder(self, folder: str) -> Path:
        """The resolved import folder; TrainerError when it does not exist or lies outside every data root."""
        src = _resolved(folder.strip()) if folder.strip() else None
        if src is None or not src.is_dir():
            raise TrainerError(f"Folder '{folder}' does not exist on the server; give the full path of a folder "
                               "of images (with .txt captions beside them).", field="folder")
        if not _under(src, self.data_roots):
            self._refuse("Folder", folder, src, self.data_roots, "--data-root", "folder")
        return src

    def inside(self, path: Path, root: Path, field: str = "folder") -> Path:
        """``path`` (found under ``root``) resolved; a symlink that leads out of ``root`` is refused."""
        real = path.resolve()
        if not _under(real, (root.resolve(),)):
            raise TrainerError(f"'{path}' is a link to {real}, outside the folder being imported ({root}); "
                               "copy the file itself into the folder, or remove the link.", field=field)
        return real

    def model(self, model: str, field: str = "model") -> str:
        """``model`` when the UI may load it: 'builtin', an existing path under a model root, or (with
        ``allow_downloads``) a hub id."""
        text = (model or "").strip()
        if not text or text == "builtin" or text in self.trusted_models:
            return text
        if looks_like_path(text):
            real = _resolved(text)
            if not real.exists():
                raise TrainerError(f"'{text}' does not exist on the server; give the full path of a "
                                   ".safetensors/.ckpt file or a diffusers folder.", field=field)
            if not _under(real, self.model_roots):
                self._refuse("Model", text, real, self.model_roots, "--model-root", field)
            return text
        if not self.allow_downloads:
            raise TrainerError(f"Model '{text}' looks like a hub id, and this server does not download models; "
                               "give the path of a model file or folder on the server, or start the UI with "
                               "--allow-downloads.", field=field)
        return text

    def adapter(self, path: str) -> Path:
        """An adapter file the UI may open: under the outputs folder (runs, blends, uploads in _imported)."""
        p = Path(path or "")
        if not path or not p.is_file():
            raise TrainerError(f"Adapter '{path}' does not exist; pick one from the list or upload one.",
                               field="adapter")
        if not _under(p.resolve(), (self.outputs,)):
            raise TrainerError(f"Adapter '{path}' is outside the outputs folder {self.outputs}; upload it on the "
                               "Preview tab instead.", field="adapter")
        return p
