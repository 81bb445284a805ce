"""Dataset scanning: a kohya-style folder (images + same-stem .txt captions) becomes a report of what
training will see: items with their final captions, sizes, duplicates, unreadable files and warnings.
"""
from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..errors import TrainerError
from .images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_reason, read_rgb

__all__ = ["IMAGE_EXTENSIONS", "DatasetItem", "DatasetReport", "scan_dataset", "apply_trigger"]

IDEAL_IMAGES = (30, 50)           # the usual advice for a character or style LoRA
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # "<repeats>_<name>", e.g. "10_ohwx woman"
# Image types people drop in that this trainer does not read: named in a warning, not skipped silently.
OTHER_IMAGE_TYPES = (".heic", ".heif", ".avif", ".jxl", ".jfif", ".svg", ".psd", ".ico", ".tga",
                     ".dng", ".cr2", ".nef", ".arw", ".raw")
_LIST_LIMIT = 5                   # file names quoted per warning


@dataclass
class DatasetItem:
    """One training image and the caption it trains with."""

    path: Path
    caption: str                  # final caption, trigger word included
    caption_source: str           # "file" | "trigger" (no caption: trigger word alone) |
    #                               "folder" (no caption: kohya folder name) | "empty"
    repeats: int = 1              # from a kohya "<repeats>_<name>" folder; 1 at the top level
    width: int = 0                # upright size in pixels (EXIF orientation applied)
    height: int = 0


@dataclass
class DatasetReport:
    """What ``scan_dataset`` found. File names are relative to ``data_dir``, with '/' separators."""

    data_dir: Path
    items: list[DatasetItem] = field(default_factory=list)   # readable images only
    num_images: int = 0
    missing_captions: list[str] = field(default_factory=list)  # no caption file, or an empty one
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (file, same content as file)
    sizes: dict[str, int] = field(default_factory=dict)
    small: list[str] = field(default_factory=list)           # short side below the resolution
    orphan_captions: list[str] = field(default_factory=list)  # caption files with no image
    warnings: list[str] = field(default_factory=list)
    tag_frequency: dict[str, int] = field(default_factory=dict)  # comma-separated tags of the captions
    resolution: int = 512
    trigger_word: str = ""
    buckets: dict = field(default_factory=dict)  # bucket table (``buckets.bucket_table``) when computed

    @property
    def num_samples(self) -> int:
        """Images per epoch once kohya folder repeats are applied (before ``TrainConfig.repeats``)."""
        return sum(item.repeats for item in self.items)

    def summary(self) -> str:
        """A multi-line, human-readable report."""
        n = self.num_images
        lines = [f"Dataset '{self.data_dir}': {n} image{'s' if n != 1 else ''}"
                 + (f" ({self.num_samples} per epoch with folder repeats)" if self.num_samples != n else "")]
        sources = Counter(item.caption_source for item in self.items)
        lines.append(f"Captions: {sources['file']} from files, {sources['trigger']} trigger word only, "
                     + (f"{sources['folder']} from folder names, " if sources["folder"] else "")
                     + f"{sources['empty']} empty")
        if self.items:
            s = self.sizes
            small = (f"; {s['smaller_than_resolution']} smaller than {self.resolution} px"
                     if self.resolution else "")
            lines.append(f"Sizes: {s['min_width']}-{s['max_width']} px wide, {s['min_height']}-"
                         f"{s['max_height']} px high{small}")
        if self.buckets:
            cells = [f"{b['resolution'][0]}x{b['resolution'][1]} ({b['count']})"
                     for b in self.buckets["buckets"].values()]
            lines.append(f"Buckets: {', '.join(cells)}; mean aspect error {self.buckets['mean_img_ar_error']:.3f}")
        lines.append(f"Unreadable: {len(self.unreadable)}, duplicates: {len(self.duplicates)}, "
                     f"orphan captions: {len(self.orphan_captions)}")
        if self.tag_frequency:
            top = sorted(self.tag_frequency.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            lines.append("Top tags: " + ", ".join(f"{tag} ({count})" for tag, count in top))
        if self.warnings:
            lines.append("Warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        else:
            lines.append("No warnings.")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings, pairs as lists)."""
        return {
            "data_dir": str(self.data_dir),
            "items": [{"path": str(i.path), "caption": i.caption, "caption_source": i.caption_source,
                       "repeats": i.repeats, "width": i.width, "height": i.height} for i in self.items],
            "num_images": self.num_images,
            "num_samples": self.num_samples,
            "missing_captions": list(self.missing_captions),
            "unreadable": [list(pair) for pair in self.unreadable],
            "duplicates": [list(pair) for pair in self.duplicates],
            "sizes": dict(self.sizes),
            "small": list(self.small),
            "orphan_captions": list(self.orphan_captions),
            "warnings": list(self.warnings),
            "tag_frequency": dict(self.tag_frequency),
            "resolution": self.resolution,
            "trigger_word": self.trigger_word,
            "buckets": dict(self.buckets),
        }


# --- scanning -----------------------------------------------------------------------------------
def apply_trigger(caption: str, trigger_word: str) -> str:
    """Prepend ``trigger_word`` as the first tag ("trig, caption") unless the caption starts with it."""
    caption, trigger = caption.strip(), trigger_word.strip().strip(",").strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    head = caption[:len(trigger)]
    rest = caption[len(trigger):len(trigger) + 1]
    if head.lower() == trigger.lower() and not (rest.isalnum() or rest == "_"):
        return caption
    return f"{trigger}, {caption}"


def scan_dataset(data_dir: str | Path, *, trigger_word: str = "", resolution: int = 512,
                 caption_extension: str = ".txt") -> DatasetReport:
    """Scan a dataset folder, decoding every image once, and report what training will see.

    Layout (kohya convention): images with the extensions in ``IMAGE_EXTENSIONS`` and captions in
    same-stem ``.txt`` files (first non-empty line, UTF-8). Images at the top level are seen once
    per epoch; images in subfolders named ``<repeats>_<name>`` (e.g. ``10_ohwx woman``) are seen
    ``repeats`` times, and, lacking a caption file, are captioned with ``<name>`` as kohya does.
    Other subfolders and deeper levels are ignored (with a warning when they hold images); hidden
    files are skipped.

    The trigger word is prepended to every caption unless the caption already starts with it; an
    image without a caption trains on the trigger word alone (or an empty caption without one).
    Problems that do not stop training are listed in ``warnings``; unreadable files are listed in
    ``unreadable`` and make ``LoraDataset`` refuse to start. A missing folder, a file, or a folder
    with no images raises ``TrainerError``.
    """
    root = _check_folder(data_dir)
    cap_ext = "." + caption_extension.lower().lstrip(".")
    report = DatasetReport(data_dir=root, resolution=resolution, trigger_word=trigger_word.strip())
    folders, notes = _find_folders(root)
    seen_bytes: dict[str, str] = {}
    seen_pixels: dict[tuple[int, int, str], str] = {}
    multi_line: list[str] = []
    others: list[str] = []
    n_captions = 0
    for folder, repeats, folder_caption in folders:
        images, captions, other = _list_folder(folder, cap_ext)
        n_captions += len(captions)
        others += [_rel(p, root) for p in other]
        stems = {p.stem for p in images}
        report.orphan_captions += [_rel(p, root) for stem, p in captions.items() if stem not in stems]
        for path in images:
            rel = _rel(path, root)
            try:
                data = path.read_bytes()
                img = read_rgb(io.BytesIO(data))
            except DECODE_ERRORS as err:
                report.unreadable.append((rel, decode_reason(err)))
                continue
            caption, source = _caption_for(path, captions.get(path.stem), folder_caption, report,
                                           multi_line, root)
            item = DatasetItem(path=path, caption=caption, caption_source=source, repeats=repeats,
                               width=img.width, height=img.height)
            report.items.append(item)
            byte_key = hashlib.blake2b(data, digest_size=16).hexdigest()
            pixel_key = (img.width, img.height, hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest())
            first = seen_bytes.get(byte_key) or seen_pixels.get(pixel_key)
            if first is not None:
                report.duplicates.append((rel, first))
            seen_bytes.setdefault(byte_key, rel)
            seen_pixels.setdefault(pixel_key, rel)
            if min(img.size) < resolution:
                report.small.append(rel)
    if not report.items and not report.unreadable:
        raise TrainerError(_no_images_message(root, n_captions, cap_ext, others), field="data_dir")
    report.num_images = len(report.items)
    report.sizes = _sizes(report.items, resolution)
    report.tag_frequency = _tag_frequency(report.items)
    report.warnings = _warnings(report, notes, multi_line, others, cap_ext)
    return report


def small_warning(r: DatasetReport) -> str:
    """The warning for ``r.small``: against the square resolution, or against each image's bucket once
    ``r.buckets`` is filled (``buckets.add_bucket_table``)."""
    sizes = {_rel(i.path, r.data_dir): f"{i.width}x{i.height}" for i in r.items}
    listed = _names([f"{s} ({sizes.get(s, '?')})" for s in r.small])
    if r.buckets:
        return (f"{len(r.small)} image(s) are smaller than the bucket they train in and will be upscaled (softer "
                f"results): {listed}; use larger originals, a lower resolution, or bucket_no_upscale.")
    return (f"{len(r.small)} image(s) are smaller than {r.resolution} px on the short side and will be upscaled "
            f"(softer results): {listed}; use larger originals or a lower resolution.")


def _check_folder(data_dir: str | Path) -> Path:
    if not str(data_dir).strip():
        raise TrainerError("No dataset folder is set; choose the folder that holds your images.",
                           field="data_dir")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise TrainerError(f"Dataset folder '{root}' does not exist; check the path.", field="data_dir")
    if not root.is_dir():
        raise TrainerError(f"Dataset path '{root}' is a file, not a folder; give the folder that holds "
                           "the images.", field="data_dir")
    return root


def _entries(folder: Path) -> list[Path]:
    """Sorted, non-hidden entries of ``folder``."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX")
    except OSError as err:
        raise TrainerError(f"Dataset folder '{folder}' cannot be read ({err.strerror or err}); check its "
                           "permissions.", field="data_dir") from err


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in _entries(folder) if p.is_file())


def _find_folders(root: Path) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """[(folder, repeats, folder caption)] to read, and notes about folders left out."""
    folders: list[tuple[Path, int, str]] = [(root, 1, "")]
    notes: list[str] = []
    for sub in (p for p in _entries(root) if p.is_dir()):
        match = KOHYA_FOLDER.match(sub.name)
        if match is None:
            if _has_images(sub):
                notes.append(f"Subfolder '{sub.name}' is ignored; to train on it, rename it "
                             f"'<repeats>_{sub.name}' (e.g. '1_{sub.name}') or move its images up.")
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            notes.append(f"Subfolder '{sub.name}' has 0 repeats and is skipped; rename it with 1 or more.")
            continue
        folders.append((sub, repeats, match.group(2).strip()))
        nested = [p.name for p in _entries(sub) if p.is_dir() and _has_images(p)]
        if nested:
            notes.append(f"Folders inside '{sub.name}' are ignored ({_names(nested)}); move their "
                         "images up into it.")
    match = KOHYA_FOLDER.match(root.name)
    if match and int(match.group(1)) > 1 and _has_images(root):
        notes.append(f"The folder name '{root.name}' looks like a kohya repeats folder, but its "
                     f"{match.group(1)} repeats only apply when you select its parent folder; here each "
                     "image counts once (or set repeats in the settings).")
    return folders, notes


def _list_folder(folder: Path, cap_ext: str) -> tuple[list[Path], dict[str, Path], list[Path]]:
    """(images, {stem: caption file}, unsupported image-like files) directly in ``folder``."""
    images: list[Path] = []
    captions: dict[str, Path] = {}
    other: list[Path] = []
    for p in _entries(folder):
        if not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(p)
        elif suffix == cap_ext:
            captions[p.stem] = p
        elif suffix in OTHER_IMAGE_TYPES:
            other.append(p)
    return images, captions, other


def _caption_for(image: Path, caption_file: Path | None, folder_caption: str, report: DatasetReport,
                 multi_line: list[str], root: Path) -> tuple[str, str]:
    """(final caption, source) for one image; records missing or unreadable captions in ``report``."""
    text = ""
    if caption_file is None:
        report.missing_captions.append(_rel(image, root))
    else:
        try:
            lines = [ln.strip() for ln in caption_file.read_bytes().decode("utf-8-sig").splitlines()]
        except UnicodeDecodeError:
            report.unreadable.append((_rel(caption_file, root), "not UTF-8 text; re-save it as UTF-8"))
        except OSError as err:
            report.unreadable.append((_rel(caption_file, root), decode_reason(err)))
        else:
            lines = [ln for ln in lines if ln]
            if len(lines) > 1:
                multi_line.append(_rel(caption_file, root))
            text = lines[0] if lines else ""
            if not text:
                report.missing_captions.append(_rel(image, root))
    if text:
        return apply_trigger(text, report.trigger_word), "file"
    caption = apply_trigger(folder_caption, report.trigger_word)
    if folder_caption:
        return caption, "folder"
    return caption, ("trigger" if caption else "empty")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _names(names: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _no_images_message(root: Path, n_captions: int, cap_ext: str, others: list[str]) -> str:
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if others:
        found = f"only {len(others)} file(s) of types this trainer cannot read ({_names(others)})"
    elif n_captions:
        found = f"only {n_captions} caption file(s) ({cap_ext})"
    else:
        found = "nothing usable"
    return (f"Dataset folder '{root}' contains no images ({found}); add images of type {accepted} "
            f"(with same-stem {cap_ext} captions), or convert them to PNG or JPEG.")


def _sizes(items: list[DatasetItem], resolution: int) -> dict[str, int]:
    widths, heights = [i.width for i in items] or [0], [i.height for i in items] or [0]
    return {"min_width": min(widths), "max_width": max(widths), "min_height": min(heights),
            "max_height": max(heights), "resolution": resolution,
            "smaller_than_resolution": sum(min(i.width, i.height) < resolution for i in items)}


def _tag_frequency(items: list[DatasetItem]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for item in items:
        counts.update(tag.strip() for tag in item.caption.split(",") if tag.strip())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _warnings(r: DatasetReport, notes: list[str], multi_line: list[str], others: list[str],
              cap_ext: str) -> list[str]:
    w: list[str] = []
    if r.unreadable:
        w.append(f"{len(r.unreadable)} file(s) cannot be read and will stop training: "
                 + _names([f"{f} ({why})" for f, why in r.unreadable]) + "; re-save or remove them.")
    lo, hi = IDEAL_IMAGES
    n = r.num_images
    if 0 < n < lo:
        w.append(f"{n} images: fewer than the {lo}-{hi} that usually work best; the LoRA may learn less "
                 "of the subject, so add varied images if you can.")
    elif n > hi:
        w.append(f"{n} images: more than the {lo}-{hi} usually needed; that is fine, but each epoch takes "
                 "longer, so fewer epochs or repeats may do.")
    by_source = {_rel(i.path, r.data_dir): i.caption_source for i in r.items}
    missing: dict[str, list[str]] = {"trigger": [], "folder": [], "empty": []}
    for rel in r.missing_captions:
        source = by_source.get(rel, "")
        if source in missing:
            missing[source].append(rel)
    if missing["trigger"]:
        w.append(f"{len(missing['trigger'])} image(s) have no caption ({cap_ext} missing or empty) and "
                 f"train on '{r.trigger_word}' alone: {_names(missing['trigger'])}; add captions for "
                 "more control.")
    if missing["folder"]:
        w.append(f"{len(missing['folder'])} image(s) have no caption ({cap_ext} missing or empty) and "
                 f"use their folder name as caption: {_names(missing['folder'])}.")
    if missing["empty"]:
        w.append(f"{len(missing['empty'])} image(s) have no caption ({cap_ext} missing or empty) and "
                 f"will train on an empty caption: {_names(missing['empty'])}; add captions or set a "
                 "trigger word.")
    if r.small:
        w.append(small_warning(r))
    if r.duplicates:
        w.append(f"{len(r.duplicates)} duplicate image(s) (same pixels): "
                 + _names([f"{a} = {b}" for a, b in r.duplicates])
                 + "; remove the copies so no image counts double.")
    if r.orphan_captions:
        w.append(f"{len(r.orphan_captions)} caption file(s) have no image with the same name: "
                 f"{_names(r.orphan_captions)}; rename them to match an image or delete them.")
    if multi_line:
        w.append(f"{len(multi_line)} caption file(s) have several lines; only the first is used (as in "
                 f"kohya): {_names(multi_line)}; join them into one line.")
    if others:
        w.append(f"{len(others)} file(s) are of image types this trainer does not read and are skipped: "
                 f"{_names(others)}; convert them to PNG or JPEG.")
    return w + notes
