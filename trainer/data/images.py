"""Image decoding and conversion: any file Pillow opens -> upright 8-bit sRGB RGB -> square tensor.

Owns the colour-mode rules (alpha on white, 16-bit/32-bit/float scaling, CMYK and ICC to sRGB).
"""
from __future__ import annotations

import functools
import io
import random
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import TrainerError

try:  # colour management needs Pillow built with littlecms (the official wheels are)
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms = None  # type: ignore[assignment]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# What Pillow raises for files it cannot decode (UnidentifiedImageError is an OSError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

_ICC_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError) + (
    (ImageCms.PyCMSError,) if ImageCms is not None else ())


def decode_reason(err: BaseException) -> str:
    """A short, user-readable reason for a decode failure (for reports and messages)."""
    text = str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not a valid image file"
    if isinstance(err, Image.DecompressionBombError):
        return "too large to decode safely (over Pillow's pixel limit)"
    if "truncated" in text or isinstance(err, EOFError):
        return "the file is truncated (an incomplete copy or download?)"
    if isinstance(err, FileNotFoundError):
        return "the file no longer exists"
    if isinstance(err, PermissionError):
        return "permission denied"
    return text or type(err).__name__


def read_rgb(source: str | Path | BinaryIO, *, min_size: int = 0) -> Image.Image:
    """Decode the first frame of ``source`` to an upright RGB image; raises ``DECODE_ERRORS``.

    ``min_size`` > 0 lets JPEGs decode at 1/2, 1/4 or 1/8 scale while both sides stay at least
    ``min_size`` px (as ``Image.thumbnail`` does): several times faster for photos that are
    resized down anyway. Use ``load_image`` unless you need the raw Pillow error.
    """
    with Image.open(source) as im:
        if min_size > 0:
            im.draft(None, (min_size, min_size))
        im.load()
        return to_rgb(_upright(im))


def load_image(path: str | Path, *, min_size: int = 0) -> Image.Image:
    """Open an image file as 8-bit RGB with its EXIF orientation applied.

    Animated files give their first frame; transparency is composited on white. A file that
    cannot be decoded raises ``TrainerError`` naming it and the fix. ``min_size``: see ``read_rgb``.
    """
    path = Path(path)
    try:
        return read_rgb(path, min_size=min_size)
    except DECODE_ERRORS as err:
        raise TrainerError(f"Image '{path.name}' cannot be decoded ({decode_reason(err)}); "
                           "re-save it as PNG or JPEG, or remove it.", field="data_dir") from err


def _upright(im: Image.Image) -> Image.Image:
    """``im`` rotated/mirrored as its EXIF Orientation tag says (``im`` itself when upright)."""
    try:
        if im.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return im
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError, struct.error):
        # A malformed EXIF block carries no usable orientation: keep the pixels as stored.
        return im


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (``img`` itself when it is already plain RGB).

    - RGBA / LA / PA / P or L or RGB with a transparency key: composited on white.
    - I;16 (any byte order): scaled by 255/65535, so 65535 -> 255 and 32768 -> 128 (Pillow's own
      conversion clips everything above 255 to white).
    - I (32-bit int): kept if within 0-255, scaled as 16-bit if within 0-65535, else stretched.
    - F (float): scaled by 255 if within 0-1, kept if within 0-255, else stretched; NaN -> black.
    - CMYK and RGB(A) with an embedded ICC profile: converted to sRGB through the profile
      (plain formula when there is none or it is unusable).
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in ("RGB", "RGBA", "CMYK") and img.info.get("icc_profile"):
        img = _icc_to_srgb(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as err:  # e.g. LAB or HSV, which Pillow cannot convert to RGB directly
        raise ValueError(f"colour mode {mode} cannot be converted to RGB") from err


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale one high-bit-depth grey channel to uint8 (see ``to_rgb`` for the rules)."""
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        finite = a[np.isfinite(a)]
        a = np.nan_to_num(a, nan=0.0, posinf=float(finite.max(initial=0.0)),
                          neginf=float(finite.min(initial=0.0)))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> "ImageCms.ImageCmsProfile":
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _icc_to_srgb(img: Image.Image) -> Image.Image:
    """Colour-manage an RGB, RGBA or CMYK image into sRGB (RGB or RGBA out).

    An unusable or mismatched profile falls back to the image unchanged, which ``to_rgb`` then
    converts with Pillow's plain formula, as every viewer without colour management shows it.
    """
    if ImageCms is None:
        return img
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        if img.mode == "RGB" and "srgb" in ImageCms.getProfileDescription(src).lower():
            return img
        alpha = img.getchannel("A") if img.mode == "RGBA" else None
        base = img.convert("RGB") if alpha is not None else img
        out = ImageCms.profileToProfile(base, src, _srgb_profile(), outputMode="RGB")
    except _ICC_ERRORS:
        return img
    if out is None:  # pragma: no cover - only when called with inPlace=True
        return img
    if alpha is not None:
        out.putalpha(alpha)
    return out


# --- training tensors -------------------------------------------------------------------------
def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` px (LANCZOS down, BICUBIC up), keeping the aspect."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new == (w, h):
        return img
    if scale < 1:  # reducing_gap: integer pre-reduction, much faster, visually the same
        return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.resize(new, Image.Resampling.BICUBIC)


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly ``size`` (width, height): LANCZOS down, BICUBIC up (``img`` itself when equal)."""
    if img.size == tuple(size):
        return img
    if size[0] * size[1] < img.width * img.height:
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.resize(size, Image.Resampling.BICUBIC)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor [3, H, W]."""
    if img.mode != "RGB":
        img = to_rgb(img)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def crop_square(pixels: torch.Tensor, size: int, *, center: bool = True,
                rng: random.Random | None = None) -> torch.Tensor:
    """Crop a [C, H, W] tensor (H, W >= size) to [C, size, size]; random offsets use ``rng``."""
    _, h, w = pixels.shape
    if center:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        rng = rng or random.Random()
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    return pixels[:, top:top + size, left:left + size]


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [C, H, W] -> contiguous float32 in [-1, 1] (what the VAE expects)."""
    return pixels.float().div_(127.5).sub_(1.0).contiguous()


def prepare_image(img: Image.Image, resolution: int, *, center_crop: bool = True, flip: bool = False,
                  rng: random.Random | None = None) -> torch.Tensor:
    """Image -> float tensor [3, resolution, resolution] in [-1, 1].

    Resizes the short side to ``resolution``, crops the long side (centre, or a random offset
    drawn from ``rng`` when ``center_crop`` is False) and mirrors it horizontally when ``flip``
    is True (the flip itself is not random: callers decide with their own RNG).
    """
    pixels = crop_square(to_uint8_tensor(resize_short_side(img, resolution)), resolution,
                         center=center_crop, rng=rng)
    if flip:
        pixels = pixels.flip(-1)
    return to_unit_range(pixels)
