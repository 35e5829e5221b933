"""The built-in server's photos: a small landscape a person can tell apart from its
neighbours (sky, sun, hills), with its number and keywords written on it.

A photo depends only on (seed, number, keywords, size, gray), so every run sees the same
bytes. The scene is drawn in coordinates relative to the size, so one photo looks the same
at every size. Fine grain gives the JPEG a photo's entropy; its strength falls with the
pixel count, as in real photos (one pixel covers less of the scene), so sizes stay near
loremflickr's at every size (see ``_grain``).
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image, ImageFont

MAX_KEYWORDS_CHARS = 48  # longer keyword lists are cut: the label must fit a thumbnail

RGB = tuple[int, int, int]


def _colour(hue: float, saturation: float, value: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _sky(rng: random.Random, width: int, height: int, hue: float) -> Image.Image:
    """A vertical gradient from a deep colour at the top to a pale one at the horizon."""
    from PIL import Image, ImageOps

    ramp = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    top = _colour(hue, rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.75))
    bottom = _colour(hue + rng.uniform(-0.12, 0.12), rng.uniform(0.15, 0.35), 0.95)
    return ImageOps.colorize(ramp, top, bottom).convert("RGB")


def _ridge(rng: random.Random, width: int, height: int, level: float) -> list[tuple[int, int]]:
    """A hill line at ``level`` (0 top, 1 bottom) as a closed polygon down to the bottom."""
    steps = rng.randint(5, 9)
    points = [(0, height)]
    for i in range(steps + 1):
        y = level + rng.uniform(-0.12, 0.08)
        points.append((round(width * i / steps), round(height * y)))
    points.append((width, height))
    return points


def _scene(rng: random.Random, width: int, height: int) -> Image.Image:
    from PIL import ImageDraw

    hue = rng.random()
    img = _sky(rng, width, height, hue)
    draw = ImageDraw.Draw(img)
    cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.12, 0.35), rng.uniform(0.06, 0.11)
    x, y, r = width * cx, height * cy, min(width, height) * r
    draw.ellipse((x - r, y - r, x + r, y + r), fill=_colour(hue + 0.5, 0.35, 1.0))
    land = hue + rng.choice((0.25, 0.33, 0.45, 0.6))
    for layer in range(3):
        value = 0.75 - 0.2 * layer
        fill = _colour(land + 0.03 * layer, 0.45 + 0.12 * layer, value)
        draw.polygon(_ridge(rng, width, height, 0.5 + 0.13 * layer), fill=fill)
    return img


def _grain(rng: random.Random, width: int, height: int) -> Image.Image:
    """Zero-centred noise (128 = none) whose amplitude falls with the pixel count."""
    from PIL import Image

    amplitude = round(min(20.0, max(14.0, 20 - 3 * math.log2(width * height / 76800))))
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    return noise.point(lambda v: 128 - amplitude // 2 + v * amplitude // 256).convert("RGB")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _label(img: Image.Image, photo: int, keywords: str) -> None:
    """The photo's number, large and centred, and its keywords below it: white on a dark
    outline, readable on any scene and in a 128 px thumbnail."""
    from PIL import ImageDraw

    width, height = img.size
    draw = ImageDraw.Draw(img)
    big = max(8, min(width // 3, height // 3))
    centre = (width / 2, height * 0.45)
    draw.text(
        centre,
        f"#{photo}",
        font=_font(big),
        anchor="mm",
        fill="white",
        stroke_width=max(1, big // 16),
        stroke_fill=(20, 20, 30),
    )
    if keywords:
        small = max(8, big // 3)
        below = (width / 2, centre[1] + big * 0.5 + small)
        draw.text(
            below,
            keywords.replace(",", ", "),
            font=_font(small),
            anchor="mm",
            fill="white",
            stroke_width=max(1, small // 8),
            stroke_fill=(20, 20, 30),
        )


def clean_keywords(raw: str) -> str:
    """Keywords as a photo knows them: printable, comma-separated, cut to a label's length."""
    words = [w.strip() for w in raw.split(",")]
    text = ",".join(w for w in words if w and w.isprintable())
    return text[:MAX_KEYWORDS_CHARS]


@lru_cache(maxsize=256)
def render_photo(
    width: int, height: int, photo: int, seed: int, gray: bool = False, keywords: str = ""
) -> bytes:
    """A deterministic JPEG: the scene of ``(seed, photo, keywords)`` at this size."""
    from PIL import ImageChops

    keywords = clean_keywords(keywords)
    scene = random.Random(f"{seed}:{photo}:{keywords}")
    img = _scene(scene, width, height)
    _label(img, photo, keywords)
    grain = _grain(random.Random(f"{seed}:{photo}:{width}x{height}"), width, height)
    img = ImageChops.add(img, grain, scale=1.0, offset=-128)
    if gray:
        img = img.convert("L")
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
