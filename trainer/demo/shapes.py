"""Seeded procedural images for the built-in demo model: captioned shapes and a broad texture mix.

Everything here is a pure function of a `numpy.random.Generator`, so a seed reproduces a dataset
bit for bit. Shapes teach the UNet and text encoder; textures teach the VAE to round-trip images
unlike the shapes (any RGB colour, stripes, checkers, gradients, noise, fine detail).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# Named colours used in captions; values are distinct in hue and lightness.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (35, 60, 210),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter for anti-aliased edges


def _polygon_star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45, rot: float = 0.0):
    out = []
    for i in range(points * 2):
        rad = r if i % 2 == 0 else r * inner
        a = rot - math.pi / 2 + i * math.pi / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               fill: tuple[int, int, int], rot: float = 0.0) -> None:
    """Draw one named shape of "radius" r centred at (cx, cy) in pixel units of `draw`'s image."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(-math.pi / 2 + k * 2 * math.pi / 3),
                cy + r * 1.05 * math.sin(-math.pi / 2 + k * 2 * math.pi / 3) + r * 0.15) for k in range(3)]
        draw.polygon(pts, fill=fill)
    elif shape == "star":
        draw.polygon(_polygon_star(cx, cy, r * 1.1, rot=rot), fill=fill)
    elif shape == "ring":
        w = r * 0.38
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(round(w))))
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_shape(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int],
                 cx: float, cy: float, r: float, size: int = 64) -> Image.Image:
    """One anti-aliased shape on a flat background; cx, cy, r are fractions of the image side."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    draw_shape(ImageDraw.Draw(img), shape, cx * big, cy * big, r * big, colour)
    return img.resize((size, size), Image.BOX)


def make_sample(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """A random named shape in a named colour on a different named background, with its caption."""
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    fg = names[rng.integers(len(names))]
    bg = names[rng.integers(len(names) - 1)]
    if bg == fg:
        bg = names[-1]
    r = rng.uniform(0.22, 0.36)
    cx, cy = rng.uniform(r + 0.04, 1 - r - 0.04, size=2)
    img = render_shape(shape, COLOURS[fg], COLOURS[bg], cx, cy, r, size)
    return img, caption(fg, shape, bg)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(colour: str, shape: str, background: str) -> str:
    """The caption format shared by the dataset, tests and docs: "a red circle on a blue background"."""
    return f"{article(colour)} {colour} {shape} on {article(background)} {background} background"


def make_dataset(n: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """`n` captioned shape images as a uint8 array (n, size, size, 3) plus captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        img, cap = make_sample(rng, size)
        images[i] = np.asarray(img)
        captions.append(cap)
    return images, captions


# ---------------------------------------------------------------- textures (VAE training mix)

def _rand_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x + 0.5, y + 0.5


def _two_tone(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return m * a + (1 - m) * b


def _aa_mask(field: np.ndarray) -> np.ndarray:
    """Anti-aliased step of a signed field measured in pixels (positive = inside)."""
    return np.clip(field + 0.5, 0.0, 1.0)


def tex_checkers(rng, size):
    x, y = _coords(size)
    cell = rng.uniform(3, 16)
    a = rng.uniform(0, math.pi)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    m = (np.floor(u / cell) + np.floor(v / cell)) % 2
    return _two_tone(m, _rand_colour(rng), _rand_colour(rng))


def tex_stripes(rng, size):
    x, y = _coords(size)
    period = rng.uniform(4, 20)
    a = rng.uniform(0, math.pi)
    u = x * math.cos(a) + y * math.sin(a)
    phase = (u / period) % 1.0
    duty = rng.uniform(0.3, 0.7)
    field = np.where(phase < duty, np.minimum(phase * period, (duty - phase) * period),
                     -np.minimum((phase - duty) * period, (1 - phase) * period))
    colours = [_rand_colour(rng) for _ in range(int(rng.integers(2, 4)))]
    if len(colours) == 2:
        return _two_tone(_aa_mask(field), colours[0], colours[1])
    idx = np.floor(u / period).astype(int) % 3
    return np.stack([colours[i] for i in range(3)])[idx]


def tex_zigzag(rng, size):
    x, y = _coords(size)
    period = rng.uniform(6, 20)
    amp = rng.uniform(2, 10)
    wl = rng.uniform(8, 24)
    tri = np.abs(((x / wl) % 1.0) - 0.5) * 2 * amp
    if rng.random() < 0.5:
        x, y = y, x
        tri = np.abs(((x / wl) % 1.0) - 0.5) * 2 * amp
    u = y + tri
    m = np.floor(u / (period / 2)) % 2
    return _two_tone(m, _rand_colour(rng), _rand_colour(rng))


def tex_gradient(rng, size):
    x, y = _coords(size)
    a = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(a) + y * math.sin(a)) / size
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    c0, c1 = _rand_colour(rng), _rand_colour(rng)
    if rng.random() < 0.3:  # radial
        cx, cy = rng.uniform(0, size, 2)
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        t = t / max(1e-6, t.max())
    return t[..., None] * c1 + (1 - t[..., None]) * c0


def tex_block_noise(rng, size):
    cell = int(rng.choice([4, 8, 16]))
    n = size // cell
    if rng.random() < 0.5:  # a small palette
        pal = np.stack([_rand_colour(rng) for _ in range(int(rng.integers(2, 6)))])
        small = pal[rng.integers(len(pal), size=(n, n))]
    else:
        small = rng.integers(0, 256, size=(n, n, 3)).astype(np.float32)
    return np.kron(small, np.ones((cell, cell, 1), dtype=np.float32))


def tex_smooth_noise(rng, size):
    n = int(rng.choice([2, 4, 8]))
    small = rng.integers(0, 256, size=(n, n, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32)


def tex_pixel_noise(rng, size):
    base = _rand_colour(rng)
    return np.clip(base + rng.normal(0, rng.uniform(3, 25), size=(size, size, 3)), 0, 255)


def tex_random_shapes(rng, size):
    big = size * 2
    img = Image.new("RGB", (big, big), tuple(int(c) for c in _rand_colour(rng)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 10))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        r = rng.uniform(0.05, 0.4) * big
        cx, cy = rng.uniform(0, big, 2)
        draw_shape(draw, shape, cx, cy, r, tuple(int(c) for c in _rand_colour(rng)), rot=rng.uniform(0, 6.3))
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)


def tex_glyphs(rng, size):
    """Text-like detail: rows of small dark/bright strokes on a flat background."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in _rand_colour(rng)))
    draw = ImageDraw.Draw(img)
    ink = tuple(int(c) for c in _rand_colour(rng))
    row_h = int(rng.integers(6, 14))
    for top in range(int(rng.integers(0, 4)), size - row_h, row_h + int(rng.integers(1, 5))):
        x = int(rng.integers(0, 6))
        while x < size - 4:
            w = int(rng.integers(2, 6))
            kind = rng.integers(3)
            if kind == 0:
                draw.rectangle([x, top, x + w - 1, top + row_h - 3], outline=ink)
            elif kind == 1:
                draw.line([x, top, x + w, top + row_h - 3], fill=ink, width=1)
            else:
                draw.ellipse([x, top + 1, x + w, top + row_h - 3], outline=ink)
            x += w + int(rng.integers(1, 4))
    return np.asarray(img, dtype=np.float32)


def tex_shape_scene(rng, size):
    """A named-palette shape scene like the UNet's data, sometimes with off-palette colours."""
    img, _ = make_sample(rng, size)
    return np.asarray(img, dtype=np.float32)


TEXTURES = {
    "checkers": tex_checkers, "stripes": tex_stripes, "zigzag": tex_zigzag, "gradient": tex_gradient,
    "block_noise": tex_block_noise, "smooth_noise": tex_smooth_noise, "pixel_noise": tex_pixel_noise,
    "random_shapes": tex_random_shapes, "glyphs": tex_glyphs, "shape_scene": tex_shape_scene,
}


def make_texture(rng: np.random.Generator, size: int = 64, kind: str | None = None) -> np.ndarray:
    """One texture as uint8 (size, size, 3); a random kind, sometimes composited with a second one."""
    kinds = list(TEXTURES)
    kind = kind or kinds[rng.integers(len(kinds))]
    img = TEXTURES[kind](rng, size)
    if kind != "shape_scene" and rng.random() < 0.3:  # paste a second texture inside a random shape
        other = TEXTURES[kinds[rng.integers(len(kinds) - 1)]](rng, size)
        mask_img = Image.new("L", (size * 2, size * 2), 0)
        r = rng.uniform(0.15, 0.45) * size * 2
        cx, cy = rng.uniform(0, size * 2, 2)
        draw_shape(ImageDraw.Draw(mask_img), SHAPES[rng.integers(len(SHAPES))], cx, cy, r, 255)
        m = np.asarray(mask_img.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
        img = m * other + (1 - m) * img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_texture_batch(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """`n` textures stacked as uint8 (n, size, size, 3)."""
    return np.stack([make_texture(rng, size) for _ in range(n)])


def to_grid(images, cols: int = 8) -> Image.Image:
    """Tile equally sized PIL images or HxWx3 uint8 arrays into one image."""
    arrs = [np.asarray(im) for im in images]
    h, w = arrs[0].shape[:2]
    rows = (len(arrs) + cols - 1) // cols
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrs):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = a
    return Image.fromarray(grid)
