"""The sample a dataset keeps of an image: filters on its original size, then img2dataset's
resize modes and an encode, all pure functions over a decoded Pillow image.

Resize modes, as img2dataset means them (``image_size`` = S):
- ``no``: the image as it is;
- ``keep_ratio``: the smaller side becomes S;
- ``keep_ratio_largest``: the larger side becomes S;
- ``center_crop``: the smaller side becomes S, then the centre S x S is cut out;
- ``border``: the larger side becomes S, then it is padded to S x S with white.
``resize_only_if_bigger`` leaves an image alone when that would enlarge it. Shrinking
averages areas (BOX, img2dataset's INTER_AREA); enlarging uses LANCZOS.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from PIL import Image

from .choices import EncodeFormat, ResizeMode
from .errors import InvalidImageError

if TYPE_CHECKING:
    from .settings import DatasetSettings
PILLOW_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
WHITE = (255, 255, 255)


class FilteredError(InvalidImageError):
    """An image refused by a filter on its size (``failed_to_resize``)."""


@dataclass(frozen=True)
class SampleSpec:
    """What a run keeps of each image. ``keep_original``: keep the downloaded bytes when
    no resize applies, whatever their format (the ``files`` layout); otherwise they are
    kept only when already in ``encode_format``."""

    resize_mode: ResizeMode = "no"
    image_size: int = 256
    resize_only_if_bigger: bool = False
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = math.inf
    max_aspect_ratio: float = math.inf
    keep_original: bool = False

    @classmethod
    def of(cls, dataset: DatasetSettings) -> SampleSpec:
        """The spec a run's dataset settings ask for (the same names, but one)."""
        named = {f.name: getattr(dataset, f.name) for f in fields(cls) if f.name != "keep_original"}
        return cls(**named, keep_original=dataset.output_format == "files")

    @property
    def ext(self) -> str:
        return "." + self.encode_format

    def filters(self) -> bool:
        return (
            bool(self.min_image_size)
            or math.isfinite(self.max_image_area)
            or math.isfinite(self.max_aspect_ratio)
        )


def check_size(width: int, height: int, spec: SampleSpec) -> None:
    """Raise ``FilteredError`` naming the cause when the original size is filtered out."""
    if min(width, height) < spec.min_image_size:
        raise FilteredError(f"image too small: {width}x{height} < {spec.min_image_size}")
    if width * height > spec.max_image_area:
        raise FilteredError(f"image area too large: {width}x{height} > {spec.max_image_area:g}")
    if max(width, height) / max(1, min(width, height)) > spec.max_aspect_ratio:
        raise FilteredError(f"aspect ratio too large: {width}x{height} > {spec.max_aspect_ratio:g}")


def resized_size(width: int, height: int, spec: SampleSpec) -> tuple[int, int] | None:
    """The size the image is scaled to before any crop or border; None: left as it is."""
    mode, size = spec.resize_mode, spec.image_size
    if mode == "no":
        return None
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    if spec.resize_only_if_bigger and side <= size:
        return None
    scale = size / max(1, side)
    return max(1, round(width * scale)), max(1, round(height * scale))


def needs_pixels(fmt: str, width: int, height: int, spec: SampleSpec) -> bool:
    """Whether the sample must be decoded and encoded, not the downloaded bytes kept."""
    if resized_size(width, height, spec) is not None:
        return True
    return not spec.keep_original and PILLOW_FORMAT[spec.encode_format] != fmt


def make_sample(
    img: Image.Image, original: tuple[int, int], spec: SampleSpec
) -> tuple[bytes, int, int]:
    """``img`` (decoded, maybe at a draft scale: ``original`` is its header's size)
    resized as ``spec`` says and encoded: the bytes, their width and height."""
    target = resized_size(*original, spec)
    out = img
    if target is not None:
        shrink = target[0] < img.width
        method = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
        source = _mode_for_resize(img)
        if spec.resize_mode == "center_crop":
            # The centre square scaled to S x S is the crop of the scaled image, and only
            # its pixels are resampled (a quarter less work from 4:3).
            size = spec.image_size
            out = source.resize((size, size), method, box=_center_square(source))
        else:
            out = source.resize(target, method)
            if spec.resize_mode == "border":
                out = _border(out, spec.image_size)
    return encode(out, spec.encode_format, spec.encode_quality), out.width, out.height


def _mode_for_resize(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "RGBA", "L", "LA"):
        return img
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("RGBA" if "A" in img.getbands() else "RGB")


def _center_square(img: Image.Image) -> tuple[float, float, float, float]:
    side = min(img.width, img.height)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    return (left, top, left + side, top + side)


def _border(img: Image.Image, size: int) -> Image.Image:
    mode = "RGBA" if "A" in img.getbands() else "RGB"
    canvas = Image.new(mode, (size, size), (*WHITE, 255) if mode == "RGBA" else WHITE)
    canvas.paste(img.convert(mode), ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def encode(img: Image.Image, fmt: EncodeFormat, quality: int) -> bytes:
    """``img`` as ``fmt`` bytes. Transparency goes on white where the format has no alpha
    (JPEG): on black, as a bare ``convert("RGB")`` does, logos and cut-outs turn dark."""
    if fmt == "jpg":
        img = flatten(img)
    elif img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = _mode_for_resize(img)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, PILLOW_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def flatten(img: Image.Image) -> Image.Image:
    """``img`` without alpha: composited on white."""
    if img.mode in ("RGB", "L"):
        return img
    rgba = _mode_for_resize(img)
    if "A" not in rgba.getbands():
        return rgba.convert("RGB")
    rgba = rgba.convert("RGBA")
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
