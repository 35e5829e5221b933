"""The CPU-bound stage: decode an image once, validate it, and make its thumbnail.

``inspect_image`` is pure (bytes in, ``ImageInfo`` out), picklable and safe to run in any
thread or process: every backend calls this one function, wherever it schedules it.
JPEG draft mode is always on: libjpeg then decodes at 1/2..1/8 scale, for a fraction of
the CPU (see benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import InvalidImageError
from .magic import ends_complete, sniff
from .samples import SampleSpec, check_size, flatten, make_sample, needs_pixels, resized_size
from .timeline import Ran

# Formats we accept; restricting Image.open keeps exotic decoders away from untrusted bytes.
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
FORMATS = list(EXTENSIONS)

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
    # The bytes to keep when they are not the downloaded ones (a resize, another format),
    # and the size of the original (``width``/``height`` are the kept image's).
    sample: bytes | None = None
    original_width: int = 0
    original_height: int = 0
    ran: Ran | None = None  # where and when it was made (only with Settings.timeline)


def inspect_image(
    data: bytes,
    size: int,
    quality: int = 85,
    verify: str = "full",
    sample: SampleSpec | None = None,
) -> ImageInfo:
    """Validate ``data`` and, when ``size`` > 0, make a JPEG thumbnail whose longest side is
    at most ``size`` pixels; with ``sample``, filter on the original size and make the
    sample (resized, encoded) from the same decode.

    ``verify="full"`` decodes every image (catching corrupt and truncated bodies).
    ``"header"`` without a thumbnail decodes no pixels: the header must parse (format,
    size, the bomb guard) and agree with the magic bytes, and the body must end with its
    format's end marker (a truncated body does not). What it misses: corrupt data between
    a valid header and end; and it refuses a JPEG with data appended after its end marker.
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            fmt = img.format or "?"
            width, height = img.size
            if width * height > (Image.MAX_IMAGE_PIXELS or 0) > 0:
                raise InvalidImageError(f"image of {width}x{height} pixels is a decompression bomb")
            if sniff(data) != fmt:
                raise InvalidImageError(f"not an image: a {fmt} header without its magic bytes")
            thumb = kept = None
            kept_size = (width, height)
            if sample is not None:
                check_size(width, height, sample)
            if sample is not None and needs_pixels(fmt, width, height, sample):
                # One decode for the check, the sample and the thumbnail, at the smallest
                # draft scale that still covers the sample's size.
                img.draft("RGB", resized_size(width, height, sample) or (width, height))
                img.load()
                kept, kept_w, kept_h = make_sample(img, (width, height), sample)
                kept_size = (kept_w, kept_h)
                thumb = _thumbnail(img, size, quality) if size > 0 else None
            elif size > 0 or verify != "header":
                # Draft mode lets libjpeg decode at 1/2..1/8 scale: the whole stream is
                # still read (so corruption is caught) at a fraction of the CPU. Asking for
                # the real thumbnail box (128x96, not 128x128) lets 320x240 decode at 1/2.
                # Validating alone needs no colour: a colour JPEG decoded to grey still has
                # every component's data read, without the colour conversion.
                img.draft("RGB" if size > 0 else "L", fit(width, height, size))
                img.load()
                thumb = _thumbnail(img, size, quality) if size > 0 else None
            elif not ends_complete(fmt, data):
                raise InvalidImageError(f"not a valid image: truncated (no {fmt} end marker)")
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
    ext = sample.ext if kept is not None and sample is not None else EXTENSIONS.get(fmt, ".img")
    w, h = kept_size
    return ImageInfo(fmt, ext, w, h, thumb, digest, kept, width, height)


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image scaled so its longest side is ``size``."""
    scale = max(size, 1) / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _thumbnail(img: Image.Image, size: int, quality: int) -> bytes:
    img = flatten(img)  # transparency on white, as in samples
    # BOX is area averaging, as img2dataset's default for shrinking (OpenCV's INTER_AREA):
    # after the draft decode the last step is small (160x120 to 128x96), and BOX takes
    # less than half of BICUBIC's CPU for it (figure in benchmarks/README.md).
    img.thumbnail((size, size), Image.Resampling.BOX)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
