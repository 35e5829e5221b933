"""Image formats told by their bytes alone: the magic numbers at the start, the end marker.

Pure functions over ``bytes``, with no Pillow: fetch uses them to accept a mislabelled
image, and ``--verify header`` to refuse a body cut short, without decoding any pixels.
"""

from __future__ import annotations

# Pillow's format names, as ``Image.format`` reports them.
_STARTS = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: no data, then its fixed CRC
# Bytes some writers leave after a JPEG's end marker (padding to a block size).
_PADDING = b"\x00\r\n \t"


def sniff(data: bytes) -> str | None:
    """The format whose magic bytes ``data`` starts with, or None."""
    for start, name in _STARTS:
        if data.startswith(start):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def looks_like_image(data: bytes) -> bool:
    """True when ``data`` starts with the magic bytes of a format we accept."""
    return sniff(data) is not None


def ends_complete(fmt: str, data: bytes) -> bool:
    """Whether ``data`` ends the way a whole file of ``fmt`` ends: a body cut short does not.

    JPEG: the EOI marker ``FF D9`` last (padding after it allowed); PNG: the IEND chunk;
    GIF: the trailer ``3B``; WebP: exactly as long as its RIFF header says (one pad byte
    allowed); BMP: at least as long as its header's file size. False for any other format,
    and where a header gives no length to check against.
    """
    if fmt == "JPEG":
        return data.rstrip(_PADDING).endswith(b"\xff\xd9")
    if fmt == "PNG":
        return data.endswith(_PNG_END)
    if fmt == "GIF":
        return data.endswith(b"\x3b")
    if fmt == "WEBP":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 in (
            len(data),
            len(data) - 1,
        )
    if fmt == "BMP":
        declared = int.from_bytes(data[2:6], "little") if len(data) >= 6 else 0
        return 0 < declared <= len(data)
    return False
