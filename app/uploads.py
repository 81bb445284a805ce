"""Files arriving in a run's dataset (uploads, .zip archives, a server folder): the size and count limits
(``Limits``), names that never overwrite (``a.png`` -> ``a-1.png``, its caption following it) and .zip
extraction that refuses links, paths and bombs. Everything is checked before the first file is written.
"""
from __future__ import annotations

import contextlib
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from trainer.errors import TrainerError
from trainer.fileio import atomic_write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")   # = trainer.data.images
MAX_ZIP_BYTES = 4 << 30          # what one archive may unpack to, all members together
NOT_DATASET = "not an image (PNG, JPEG, WebP, BMP, GIF, TIFF), a .txt caption or a .zip"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """``max_upload_mb`` per file (an upload, a zip member, a file of an imported folder); ``max_images`` per run
    (the dataset after the upload)."""

    max_upload_mb: float = 50
    max_images: int = 500

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    def check_size(self, name: str, size: int) -> None:
        if size > self.max_bytes:
            raise TrainerError(f"'{name}' is {size / (1 << 20):.3g} MB, over this server's limit of "
                               f"{self.max_upload_mb:g} MB per file; nothing was added. Shrink or split it, or "
                               "start the UI with a higher --max-upload-mb.", field="upload")


@dataclass
class _Entry:
    name: str                        # base name as uploaded
    path: Path | None = None         # a file on disk, or
    member: zipfile.ZipInfo | None = None   # a member of ``archive``
    archive: Path | None = None
    index: int = 0                   # position in its archive (the order files not added are listed in)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _zip_entries(archive: Path, limits: Limits) -> tuple[list[_Entry], list[tuple[str, str, int]]]:
    """The images and captions of a .zip (base names only), its sizes checked; (entries, (name, why, position)
    not taken; hidden and __MACOSX entries go unmentioned)."""
    entries, skipped = [], []
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError) as err:
        raise TrainerError(f"'{archive.name}' is not a readable .zip file ({err}); re-create it or upload "
                           "the images directly.", field="upload") from None
    total = sum(m.file_size for m in members)
    if total > MAX_ZIP_BYTES:
        raise TrainerError(f"'{archive.name}' declares {total / (1 << 30):.1f} GB of contents, more than the "
                           f"{MAX_ZIP_BYTES >> 30} GB one archive may unpack to; nothing was added. Upload a "
                           "smaller archive.", field="upload")
    for index, m in enumerate(members):
        name = PurePosixPath(m.filename.replace("\\", "/")).name
        is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
        suffix = Path(name).suffix.lower()
        if not name or name.startswith(".") or "__MACOSX" in m.filename:
            continue
        if is_link or suffix not in IMAGE_EXTENSIONS + (".txt",):
            skipped.append((f"{archive.name}: {name}", "a link" if is_link else NOT_DATASET, index))
            continue
        limits.check_size(f"{archive.name}: {name}", m.file_size)
        entries.append(_Entry(name, member=m, archive=archive, index=index))
    return entries, skipped


def _extract(entry: _Entry, target: Path | None = None) -> bytes:
    """Stream one zip member to ``target`` (images; b"" returned) or return its bytes (``target`` None: captions),
    never more than it declares: a member that unpacks to more, or fails its checksum, is refused (a zip bomb or
    damage) and its partial file removed."""
    m, archive = entry.member, entry.archive
    assert m is not None and archive is not None
    seen, chunks = 0, []
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(m) as src, \
                (open(target, "xb") if target is not None else contextlib.nullcontext()) as out:
            while chunk := src.read(CHUNK):
                seen += len(chunk)
                if seen > m.file_size:
                    raise zipfile.BadZipFile("more data than declared")
                if target is None:
                    chunks.append(chunk)
                else:
                    out.write(chunk)
            if seen != m.file_size:
                raise zipfile.BadZipFile(f"{seen} bytes inside")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error) as err:
        if target is not None and not isinstance(err, FileExistsError):
            target.unlink(missing_ok=True)
        raise TrainerError(f"'{archive.name}': member '{entry.name}' declares {m.file_size} bytes but does not "
                           f"unpack to them ({err}): a damaged or encrypted archive, or a zip bomb; nothing more was "
                           "added. Re-create the archive or upload the images directly.", field="upload") from None
    return b"".join(chunks)


def free_name(dest: Path, name: str, taken: set[str] | None = None) -> str:
    """``name``, or ``stem-1.ext``, ``stem-2.ext``... the first one neither in ``dest`` nor taken by this upload."""
    taken = set() if taken is None else taken
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, n = name, 0
    while (dest / candidate).exists() or candidate.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    taken.add(candidate.lower())
    return candidate


@dataclass
class Added:
    """What an upload did: the note to show, the image names added, (name, why) for each file not added."""

    note: str
    added: list[str]
    rejected: list[tuple[str, str]]


def add_files(dest: Path, paths: Iterable[str | Path], limits: Limits, existing_images: int,
              image_problem: Callable[[Path], str | None] = lambda path: None) -> Added:
    """Copy uploaded images, same-stem .txt captions and .zip archives into ``dest``. Sizes and the image count
    are checked first (TrainerError, nothing written). A name already in the dataset gets a suffix (its caption
    from the same upload follows it); a caption alone for an image that already has one is kept as it was, not
    overwritten. An image ``image_problem`` finds undecodable, and any other kind of file, is not added: it is
    listed with its reason."""
    paths = [Path(p) for p in paths]
    entries: list[_Entry] = []
    skipped: list[tuple[str, str, int]] = []         # (name, why, position in its archive)
    for p in paths:
        suffix = p.suffix.lower()
        if suffix not in IMAGE_EXTENSIONS + (".txt", ".zip"):
            skipped.append((p.name, NOT_DATASET, 0))
            continue
        limits.check_size(p.name, p.stat().st_size)
        if suffix == ".zip":
            found, also = _zip_entries(p, limits)
            entries += found
            skipped += also
        else:
            entries.append(_Entry(p.name, path=p))
    new_images = sum(_is_image(e.name) for e in entries)
    if existing_images + new_images > limits.max_images:
        raise TrainerError(f"This upload has {new_images} image(s) and the dataset {existing_images}; together "
                           f"that is over this server's limit of {limits.max_images} images per run; nothing was "
                           "added. Upload fewer, or start the UI with a higher --max-images.", field="upload")
    dest.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    stems: dict[str, str] = {}                      # uploaded image stem -> stem it was saved under
    images = captions = renamed = 0
    kept: list[str] = []
    added: list[str] = []
    for e in (e for e in entries if _is_image(e.name)):
        label = e.name if e.archive is None else f"{e.archive.name}: {e.name}"
        if e.path is not None and (problem := image_problem(e.path)):
            skipped.append((label, f"cannot be decoded: {problem}; re-save it as PNG or JPEG", 0))
            continue
        name = free_name(dest, e.name, taken)
        if e.path is not None:
            shutil.copyfile(e.path, dest / name)
        else:
            _extract(e, dest / name)
            if problem := image_problem(dest / name):
                (dest / name).unlink()
                taken.discard(name.lower())
                skipped.append((label, f"cannot be decoded: {problem}; re-save it as PNG or JPEG", e.index))
                continue
        renamed += name != e.name
        stems.setdefault(Path(e.name).stem, Path(name).stem)
        added.append(name)
        images += 1
    for e in (e for e in entries if not _is_image(e.name)):
        stem = Path(e.name).stem
        target = dest / (f"{stems[stem]}.txt" if stem in stems else e.name)
        if stem not in stems and target.exists():
            kept.append(e.name)
            continue
        data = e.path.read_bytes() if e.path is not None else _extract(e)
        atomic_write_text(target, data.decode("utf-8", errors="replace").strip())
        captions += 1
    note = f"Added {images} image(s) and {captions} caption file(s)"
    if renamed:
        note += f"; {renamed} image(s) renamed with a -N suffix because that name was taken"
    if kept:
        note += f"; kept the existing caption(s) {', '.join(kept[:5])} (edit them below)"
    order = {p.name: i for i, p in enumerate(paths)}          # say what was not added in upload order
    skipped.sort(key=lambda r: (order.get(r[0].split(": ")[0], len(order)), r[2]))
    if skipped:
        shown = ", ".join(r[0] for r in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        note += f"; {len(skipped)} file(s) not added ({shown}): see 'Not added' below for why"
    return Added(note + ".", added, [(name, why) for name, why, _ in skipped])
