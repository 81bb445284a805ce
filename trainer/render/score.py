"""How much a rendered image looks like a training set, for the effect check (``render/effect.py``).

``ImageScorer`` (default, numpy/PIL, any subject): a colour histogram and an edge-structure descriptor of each
image at 64 px, compared with the training images' mean descriptors by total-variation distance; similarity =
1 - the mean of the two distances (0..1, higher = closer). ``ClipScorer`` (``--clip-model PATH``): cosine
similarity of CLIP image embeddings to the training set's mean embedding, from a local transformers folder.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import TrainerError

SIZE = 64                 # descriptors are computed on a 64 x 64 copy: cheap, and blind to fine texture
COLOUR_BINS = 4           # per RGB channel: 64 joint cells (8 made near-white and white disjoint)
ORIENTATION_BINS = 8      # gradient directions over 180 degrees, weighted by gradient strength
MAGNITUDE_EDGES = (0.02, 0.05, 0.1, 0.2, 0.4)   # luminance-gradient bins (0..1 luminance per pixel)
GRID = 4                  # edge density on a 4 x 4 grid: where the structure is


def _rgb(image) -> np.ndarray:
    """PIL image or HxWx3 array (uint8, or float in [0, 1]) -> float32 SIZE x SIZE x 3 in [0, 1]."""
    if not isinstance(image, Image.Image):
        a = np.asarray(image)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
        image = Image.fromarray(a[..., :3])
    small = image.convert("RGB").resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def colour_histogram(rgb: np.ndarray) -> np.ndarray:
    """Joint RGB histogram (COLOUR_BINS**3 cells, sums to 1)."""
    q = np.clip((rgb * COLOUR_BINS).astype(int), 0, COLOUR_BINS - 1).reshape(-1, 3)
    cells = (q[:, 0] * COLOUR_BINS + q[:, 1]) * COLOUR_BINS + q[:, 2]
    return np.bincount(cells, minlength=COLOUR_BINS ** 3) / len(cells)


def edge_descriptor(rgb: np.ndarray) -> np.ndarray:
    """Edge structure of the luminance, three parts each summing to 1/3: gradient orientation (weighted by
    strength), gradient-strength histogram, and edge density per cell of a GRID x GRID layout."""
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gy, gx = np.gradient(lum)
    mag = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    orient = np.bincount(np.minimum((angle / np.pi * ORIENTATION_BINS).astype(int), ORIENTATION_BINS - 1).ravel(),
                         weights=mag.ravel(), minlength=ORIENTATION_BINS)
    strength = np.bincount(np.digitize(mag.ravel(), MAGNITUDE_EDGES), minlength=len(MAGNITUDE_EDGES) + 1)
    cells = mag.reshape(GRID, SIZE // GRID, GRID, SIZE // GRID).sum(axis=(1, 3)).ravel()
    return np.concatenate([_unit(orient), _unit(strength), _unit(cells)]) / 3.0


def _unit(h: np.ndarray) -> np.ndarray:
    """``h`` scaled to sum 1 (a flat image, with no edges at all, gets a uniform histogram)."""
    h = np.asarray(h, dtype=np.float64)
    total = h.sum()
    return h / total if total > 0 else np.full(len(h), 1.0 / len(h))


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance between the rows of ``a`` and ``b`` (each summing to 1): 0 same, 1 disjoint."""
    return 0.5 * np.abs(a - b).sum(axis=-1)


class ImageScorer:
    """Similarity of images to a training set by colours and edge structure (no model needed)."""

    name = "colour+edges"

    def __init__(self, reference: Sequence):
        if not len(reference):
            raise TrainerError("The effect check needs the training images to compare with and found none; "
                               "check the run's data folder.", field="data_dir")
        colours, edges = self._features(reference)
        self.colour, self.edges = colours.mean(0), edges.mean(0)
        # how close the training images themselves are to their own mean: the score's ceiling for this set
        self.dataset_score = float(self.scores(reference).mean())

    @staticmethod
    def _features(images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        rgbs = [_rgb(im) for im in images]
        return np.stack([colour_histogram(a) for a in rgbs]), np.stack([edge_descriptor(a) for a in rgbs])

    def scores(self, images: Sequence) -> np.ndarray:
        """One similarity in 0..1 per image: 1 - mean(colour distance, edge distance) to the set's means."""
        colours, edges = self._features(images)
        return 1.0 - 0.5 * (_tv(colours, self.colour[None]) + _tv(edges, self.edges[None]))


class ClipScorer:
    """Cosine similarity of CLIP image embeddings to the training set's mean embedding (``path``: a local
    transformers folder of a CLIPModel or CLIPVisionModel(WithProjection) with its image processor)."""

    name = "clip"

    def __init__(self, reference: Sequence, path: str | Path):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise TrainerError(f"--clip-model '{path}' is not a model folder (no config.json there); give a local "
                               "folder of a CLIP model saved with transformers (e.g. openai/clip-vit-base-patch32).",
                               field="clip_model")
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder).eval()
        except (OSError, ValueError) as err:
            raise TrainerError(f"--clip-model '{path}' cannot be loaded ({err}); give a CLIP model folder with its "
                               "preprocessor_config.json.", field="clip_model") from None
        self._torch = torch
        self.reference = self._embed(reference).mean(0)
        self.reference /= np.linalg.norm(self.reference)
        self.dataset_score = float(self.scores(reference).mean())

    def _embed(self, images: Sequence) -> np.ndarray:
        rgb = [im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
        with self._torch.no_grad():
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
            if hasattr(self.model, "get_image_features"):      # CLIPModel
                emb = self.model.get_image_features(pixel_values=pixels)
            else:                                               # a vision tower alone
                out = self.model(pixel_values=pixels)
                emb = getattr(out, "image_embeds", None)
                emb = out.pooler_output if emb is None else emb
        emb = getattr(emb, "pooler_output", emb)
        emb = emb.float().numpy()
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def scores(self, images: Sequence) -> np.ndarray:
        return self._embed(images) @ self.reference


def make_scorer(reference: Sequence, clip_model: str | Path | None = None):
    """``ClipScorer`` when a CLIP folder is given, else ``ImageScorer``."""
    return ClipScorer(reference, clip_model) if clip_model else ImageScorer(reference)
