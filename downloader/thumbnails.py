"""The CPU-bound stage: decode an image once, validate it, and make its thumbnail.

``inspect_image`` is pure (bytes in, ``ImageInfo`` out), picklable and safe to run in any
thread or process: every backend calls this one function, wherever it schedules it.
Measured here (Pillow 13, 2 cores): 640x480 JPEG -> 128 px costs ~2.7 ms of CPU with JPEG
draft mode and ~4.3 ms without, so draft mode is always on.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import InvalidImageError

# Formats we accept; restricting Image.open keeps exotic decoders away from untrusted bytes.
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")

# A decompression bomb is an error, not a warning, whatever the caller's warning filters.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    ext: str
    width: int
    height: int
    thumbnail: bytes | None
    sha256: str  # of the original bytes: hashed here, off the event loop


def looks_like_image(data: bytes) -> bool:
    """True when ``data`` starts with the magic bytes of a format we accept."""
    return data.startswith(MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def inspect_image(data: bytes, size: int, quality: int = 85) -> ImageInfo:
    """Decode ``data`` fully (catching corrupt and truncated bodies) and, when ``size`` > 0,
    return a JPEG thumbnail whose longest side is at most ``size`` pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=list(EXTENSIONS)) as img:
            fmt = img.format or "?"
            width, height = img.size
            if width * height > (Image.MAX_IMAGE_PIXELS or 0) > 0:
                raise InvalidImageError(f"image of {width}x{height} pixels is a decompression bomb")
            # Draft mode lets libjpeg decode at 1/2..1/8 scale: the whole stream is still
            # read (so corruption is caught) at a fraction of the CPU. Asking for the real
            # thumbnail box (128x96, not 128x128) lets 320x240 decode at 1/2: 1.7 -> 0.9 ms.
            img.draft("RGB", fit(width, height, size))
            img.load()
            thumb = _thumbnail(img, size, quality) if size > 0 else None
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"decompression bomb: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise InvalidImageError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports unknown formats, truncation and corrupt data as these.
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidImageError("not an image: unrecognised format") from None
        raise InvalidImageError(f"not a valid image: {_short(exc)}") from None
    digest = hashlib.sha256(data).hexdigest()
    return ImageInfo(fmt, EXTENSIONS.get(fmt, ".img"), width, height, thumb, digest)


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image scaled so its longest side is ``size``."""
    scale = max(size, 1) / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _thumbnail(img: Image.Image, size: int, quality: int) -> bytes:
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() else img.convert("RGB")
    img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
