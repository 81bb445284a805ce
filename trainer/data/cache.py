"""Caches that take the VAE and the text encoder out of the training step: VAE latent moments per image
variant (in memory, and on disk so later runs on the same images reuse them) and text-encoder outputs per
caption (in memory).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from ..fileio import atomic_write_bytes
from .dataset import LoraDataset
from .images import to_unit_range

ENCODE_BATCH = 8   # images per VAE call while filling the cache on a GPU (on a CPU one at a time is faster:
#                  SD1.5-size VAE at 256 px, bf16, 2 cores: 0.93 s per image alone, 1.35 s in a batch of 8)
ENTRY_SUFFIX = ".latent"  # safetensors files, named so that nothing takes them for a LoRA


def vae_identity(vae: torch.nn.Module, name: str = "") -> str:
    """A short fingerprint of a VAE: its config, dtype and a few of its weights (same VAE -> same id)."""
    digest = hashlib.blake2b(digest_size=12)
    config = dict(getattr(vae, "config", {}) or {})
    digest.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True,
                             default=str).encode())
    digest.update(name.encode())
    params = list(vae.parameters())
    for p in params[:2] + params[-2:]:
        digest.update(str(p.dtype).encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FillStats:
    computed: int = 0      # entries encoded by the VAE now
    loaded: int = 0        # entries read back from disk
    written: int = 0       # entry files written

    def line(self, folder: Path | None) -> str:
        where = f" in {folder}" if folder else " (memory only)"
        return (f"latent cache{where}: {self.computed} encoded, {self.loaded} reused from disk, "
                f"{self.written} file(s) written")


class LatentCache:
    """VAE latent moments (the encoder's mean and log-variance) for every (image, flip) a dataset serves.

    An entry's key hashes the image file's bytes, its placement (bucket, resize, crop), the flip and the
    VAE's identity, so a changed image recomputes only its own entry and a different VAE never reads
    another's. Sampling from the moments at train time (``DiagonalGaussianDistribution``) draws exactly the
    same noise as encoding then, so cached and uncached runs match. Only valid for fixed crops.
    """

    def __init__(self, vae_id: str, folder: str | Path | None = None):
        self.vae_id = vae_id
        self.folder = Path(folder) if folder else None
        self._entries: dict[tuple[int, bool], torch.Tensor] = {}

    def key(self, dataset: LoraDataset, item_index: int, flip: bool, file_hash: str) -> str:
        p = dataset.placements[item_index]
        spec = json.dumps({"file": file_hash, "bucket": p.bucket, "resized": p.resized,
                           "crop": [p.crop_left, p.crop_top], "flip": flip, "vae": self.vae_id})
        return hashlib.blake2b(spec.encode(), digest_size=16).hexdigest()

    def fill(self, dataset: LoraDataset, encode: Callable[[torch.Tensor], torch.Tensor],
             share: tuple[int, int] = (0, 1), batch: int = ENCODE_BATCH) -> FillStats:
        """Load or compute every entry ``dataset`` needs. ``encode`` maps pixels [B, 3, H, W] in [-1, 1] to
        moments [B, 2C, h, w]; it is called once per group of up to ENCODE_BATCH same-bucket images.
        ``share`` (rank, processes): only images ``i % processes == rank`` (a process's part of a shared
        disk cache; fill again without it, after the others finished, to read the rest). ``batch``: images per
        ``encode`` call."""
        stats = FillStats()
        flips = (False, True) if dataset.random_flip else (False,)
        todo: dict[tuple[int, int], list[tuple[int, bool, str]]] = {}
        for i, item in enumerate(dataset.items):
            if i % share[1] != share[0]:
                continue
            file_hash = hashlib.blake2b(Path(item.path).read_bytes(), digest_size=16).hexdigest()
            for flip in flips:
                key = self.key(dataset, i, flip, file_hash)
                path = self.folder / f"{key}{ENTRY_SUFFIX}" if self.folder else None
                if path is not None and path.is_file():
                    try:
                        self._entries[(i, flip)] = load_file(path)["moments"]
                        stats.loaded += 1
                        continue
                    except Exception:  # noqa: BLE001 - a damaged entry is recomputed and rewritten
                        pass
                todo.setdefault(dataset.placements[i].bucket, []).append((i, flip, key))
        for group in todo.values():
            for start in range(0, len(group), batch):
                chunk = group[start:start + batch]
                pixels = torch.stack([to_unit_range(dataset.pixels(i).flip(-1) if flip else dataset.pixels(i))
                                      for i, flip, _ in chunk])
                with torch.no_grad():
                    moments = encode(pixels).float().cpu()
                for (i, flip, key), m in zip(chunk, moments):
                    self._entries[(i, flip)] = m.clone()
                    stats.computed += 1
                    if self.folder is not None:
                        self.folder.mkdir(parents=True, exist_ok=True)
                        atomic_write_bytes(self.folder / f"{key}{ENTRY_SUFFIX}", save({"moments": m.contiguous()}))
                        stats.written += 1
        return stats

    def get(self, item_index: int, flip: bool) -> torch.Tensor:
        return self._entries[(item_index, flip)]


class TextCache:
    """Text-encoder outputs per caption, for runs that train no text encoder and whose captions do not change
    between epochs. ``encode(captions)`` returns the same dict as ``encode_prompts`` (batched)."""

    def __init__(self, encode_one: Callable[[list[str]], dict]):
        self._encode = encode_one
        self._entries: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def warm(self, captions: list[str]) -> None:
        """Encode every distinct caption once, in batches of ENCODE_BATCH."""
        todo = sorted({c for c in captions if c not in self._entries})
        for start in range(0, len(todo), ENCODE_BATCH):
            self._store(todo[start:start + ENCODE_BATCH])

    def encode(self, captions: list[str]) -> dict:
        missing = sorted({c for c in captions if c not in self._entries})
        if missing:
            self._store(missing)
        states = torch.stack([self._entries[c]["states"] for c in captions])
        out: dict = {"encoder_hidden_states": states}
        if "pooled" in self._entries[captions[0]]:
            pooled = torch.stack([self._entries[c]["pooled"] for c in captions])
            time_ids = torch.stack([self._entries[c]["time_ids"] for c in captions])
            out["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return out

    def _store(self, captions: list[str]) -> None:
        with torch.no_grad():
            cond = self._encode(captions)
        extra = cond.get("added_cond_kwargs")
        for j, caption in enumerate(captions):
            entry = {"states": cond["encoder_hidden_states"][j].detach()}
            if extra:
                entry["pooled"] = extra["text_embeds"][j].detach()
                entry["time_ids"] = extra["time_ids"][j].detach()
            self._entries[caption] = entry
