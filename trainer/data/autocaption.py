"""Auto-captioning: a captioning model in a local folder writes one caption per image into the caption files
training reads (``<image stem><caption_extension>``). Two kinds of folder: a transformers image-to-text model
saved with ``save_pretrained`` (BLIP, BLIP-2, GIT, Florence-2: whatever ``AutoModelForImageTextToText`` loads),
or a WD14-style ONNX tagger (``model.onnx`` + ``selected_tags.csv``, needs the optional ``onnxruntime``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..errors import TrainerError
from ..fileio import atomic_write_text
from .images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_reason, read_rgb
from .scan import apply_trigger

MODEL_HELP = ("a local folder holding a transformers image-to-text model saved with save_pretrained (BLIP, "
              "BLIP-2, GIT, Florence-2) or a WD14 tagger (model.onnx + selected_tags.csv)")
# Florence-2 does nothing without a task prompt; the others caption unprompted.
TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}
ONNX_MODEL, ONNX_TAGS = "model.onnx", "selected_tags.csv"


class Captioner(Protocol):
    source: str

    def caption(self, images: list) -> list[str]: ...


@dataclass
class CaptionResult:
    """What ``caption_folder`` did, by file name relative to the folder."""

    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)            # had a caption and --overwrite was not given
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, why)

    def summary(self) -> str:
        text = f"Captioned {len(self.written)} image(s); kept {len(self.kept)} existing caption(s)"
        if self.failed:
            shown = "; ".join(f"{n} ({why})" for n, why in self.failed[:5]) + (" ..." if len(self.failed) > 5 else "")
            text += f"; {len(self.failed)} image(s) could not be read: {shown}"
        return text + "."


def load_captioner(model: str | Path | None, *, device: str | None = None, max_new_tokens: int = 40) -> Captioner:
    """The captioner in folder ``model``; TrainerError (field ``caption_model``) naming what is wrong."""
    text = str(model or "").strip()
    if not text:
        raise TrainerError(f"No captioning model is set; give {MODEL_HELP}.", field="caption_model")
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise TrainerError(f"Captioning model '{text}' is not a folder on this machine; give {MODEL_HELP}.",
                           field="caption_model")
    if (folder / ONNX_MODEL).is_file() and (folder / ONNX_TAGS).is_file():
        return OnnxTagger(folder)
    if (folder / "config.json").is_file():
        return TransformersCaptioner(folder, device=device, max_new_tokens=max_new_tokens)
    raise TrainerError(f"Captioning model folder '{folder}' has neither a config.json (transformers) nor "
                       f"{ONNX_MODEL} + {ONNX_TAGS} (WD14 tagger); give {MODEL_HELP}.", field="caption_model")


class TransformersCaptioner:
    """An image-to-text model loaded with AutoProcessor + AutoModelForImageTextToText, from local files only."""

    def __init__(self, folder: Path, *, device: str | None = None, max_new_tokens: int = 40):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as KNOWN

        self.source = str(folder)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise TrainerError(f"Captioning model '{folder}': its config.json cannot be read by transformers "
                               f"({err}); give {MODEL_HELP}.", field="caption_model") from None
        if config.model_type not in KNOWN:
            raise TrainerError(f"Captioning model '{folder}' is a '{config.model_type}' model, not an image-to-text "
                               f"one (known: {', '.join(sorted(KNOWN)[:12])}, ...); give {MODEL_HELP}.",
                               field="caption_model")
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TrainerError(f"Captioning model '{folder}' cannot be loaded ({type(err).__name__}: {err}); it needs "
                               "its weights and its processor files (tokenizer, image processor) as saved by "
                               "save_pretrained.", field="caption_model") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.prompt = TASK_PROMPTS.get(config.model_type)
        self.max_new_tokens = max_new_tokens

    def caption(self, images: list) -> list[str]:
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        prompt_len = inputs["input_ids"].shape[1] if self.prompt and not self.model.config.is_encoder_decoder else 0
        texts = self.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


class OnnxTagger:
    """A WD14-style tagger: square BGR image -> one probability per tag in selected_tags.csv; general tags above
    ``threshold`` and character tags above ``character_threshold`` become the caption, most likely first."""

    def __init__(self, folder: Path, threshold: float = 0.35, character_threshold: float = 0.85):
        try:
            import onnxruntime
        except ImportError:
            raise TrainerError(f"Captioning model '{folder}' is an ONNX tagger, which needs onnxruntime; install it "
                               "with: pip install 'lora-trainer[caption]' (or pip install onnxruntime).",
                               field="caption_model") from None
        self.source = str(folder)
        self.session = onnxruntime.InferenceSession(str(folder / ONNX_MODEL), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.size = int(self.input.shape[1]) if isinstance(self.input.shape[1], int) else 448
        self.tags, self.categories = _read_tags(folder / ONNX_TAGS)
        self.threshold, self.character_threshold = threshold, character_threshold

    def caption(self, images: list) -> list[str]:
        import numpy as np

        batch = np.stack([_tagger_pixels(img, self.size) for img in images])
        probs = self.session.run(None, {self.input.name: batch})[0]
        if probs.shape[-1] != len(self.tags):
            raise TrainerError(f"ONNX tagger '{self.source}' gives {probs.shape[-1]} scores but {ONNX_TAGS} lists "
                               f"{len(self.tags)} tags; use the csv that came with the model.", field="caption_model")
        out = []
        for row in probs:
            picked = [(p, t) for p, t, c in zip(row, self.tags, self.categories)
                      if (c == 0 and p >= self.threshold) or (c == 4 and p >= self.character_threshold)]
            out.append(", ".join(t for _, t in sorted(picked, key=lambda pt: -pt[0])))
        return out


def _read_tags(path: Path) -> tuple[list[str], list[int]]:
    """(tag names with '_' as spaces, categories: 0 general, 4 character, 9 rating) from selected_tags.csv."""
    tags, cats = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            name = row.get("name", "")
            tags.append(name.replace("_", " ") if len(name) > 3 else name)   # keep emoticons such as ^_^
            cats.append(int(row.get("category") or 0))
    if not tags:
        raise TrainerError(f"'{path}' lists no tags (it needs the columns name and category).",
                           field="caption_model")
    return tags, cats


def _tagger_pixels(img, size: int):
    """Pad to a white square, resize to ``size`` and return float32 BGR 0-255, as WD14 taggers expect."""
    import numpy as np
    from PIL import Image

    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


def dataset_images(data_dir: str | Path) -> list[Path]:
    """The images training reads: the folder's own and those of its kohya ``<repeats>_<name>`` subfolders."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TrainerError(f"Dataset folder '{data_dir}' does not exist; give the folder of your images.",
                           field="data_dir")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and p.name.split("_", 1)[0].isdigit())
    return [p for d in folders for p in sorted(d.iterdir(), key=lambda p: p.name.lower())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]


def caption_folder(data_dir: str | Path, captioner: Captioner, *, overwrite: bool = False, prefix: str = "",
                   caption_extension: str = ".txt", batch_size: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> CaptionResult:
    """Write a caption for each image of ``data_dir`` that has none (every image with ``overwrite``), with
    ``prefix`` (the trigger word) put first. An existing empty caption file counts as none. Each file is
    written as soon as its caption is made, so an interruption loses nothing already written."""
    ext = "." + caption_extension.strip().lstrip(".")
    if ext == "." or "/" in ext or "\\" in ext:
        raise TrainerError(f"Caption extension {caption_extension!r} is not usable; use e.g. .txt or .caption.",
                           field="caption_extension")
    root = Path(data_dir).expanduser()
    result = CaptionResult()
    todo = []
    images = dataset_images(root)
    if not images:
        raise TrainerError(f"Dataset folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)}).",
                           field="data_dir")
    for path in images:
        rel = path.relative_to(root).as_posix()
        cap = path.with_suffix(ext)
        if not overwrite and cap.is_file() and cap.read_text(encoding="utf-8", errors="replace").strip():
            result.kept.append(rel)
        else:
            todo.append((rel, path, cap))
    done = 0
    for start in range(0, len(todo), max(int(batch_size), 1)):
        batch, pictures = [], []
        for rel, path, cap in todo[start:start + max(int(batch_size), 1)]:
            try:
                pictures.append(read_rgb(path))
                batch.append((rel, cap))
            except DECODE_ERRORS as err:
                result.failed.append((rel, decode_reason(err)))
        if batch:
            for (rel, cap), text in zip(batch, captioner.caption(pictures)):
                atomic_write_text(cap, apply_trigger(text, prefix))
                result.written.append(rel)
        done += len(todo[start:start + max(int(batch_size), 1)])
        if progress is not None:
            progress(done, len(todo))
    return result
