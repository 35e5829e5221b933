"""``--verify header``: what it still refuses without decoding pixels, and what it misses."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from helpers import bomb_png, jpeg, make_settings
from PIL import Image, ImageFile

from downloader.errors import FetchError, InvalidImageError, RetryableFetchError
from downloader.fetch import check_length, failure_for
from downloader.magic import ends_complete, looks_like_image, sniff
from downloader.pipeline import run
from downloader.server import choose_fault, make_app, server_thread
from downloader.settings import HttpSettings, ServerSettings, ThumbnailSettings
from downloader.thumbnails import inspect_image

HTTP = HttpSettings(timeout=7, max_redirects=3)


def encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, fmt)
    return out.getvalue()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the pixel decodes Pillow is asked for."""
    calls: list[int] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    yield calls


# ---------------------------------------------------------------------------- magic bytes


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_each_format_is_told_by_its_magic_and_ends_complete(fmt: str) -> None:
    data = encoded(fmt)
    assert sniff(data) == fmt
    assert looks_like_image(data)
    assert ends_complete(fmt, data)
    assert not ends_complete(fmt, data[: len(data) - 5])


@pytest.mark.parametrize("body", [b"", b"<html>hi</html>", b"RIFF\0\0\0\0WAVE", b"\xff\xd8"])
def test_non_images_have_no_format(body: bytes) -> None:
    assert sniff(body) is None
    assert not looks_like_image(body)


def test_jpeg_end_marker_may_be_followed_by_padding_only() -> None:
    data = jpeg(1)
    assert ends_complete("JPEG", data + b"\x00\x00\r\n")
    assert not ends_complete("JPEG", data + b"trailer")
    assert not ends_complete("TIFF", data)


# ---------------------------------------------------------------------------- inspect_image


def test_header_mode_accepts_a_whole_image_without_decoding(decodes: list[int]) -> None:
    data = jpeg(1, (320, 240))
    info = inspect_image(data, 0, verify="header")
    assert (info.format, info.width, info.height, info.thumbnail) == ("JPEG", 320, 240, None)
    assert decodes == []
    inspect_image(data, 0, verify="full")
    assert decodes == [1]


def test_header_mode_with_a_thumbnail_decodes_anyway(decodes: list[int]) -> None:
    info = inspect_image(jpeg(1, (320, 240)), 64, verify="header")
    assert info.thumbnail is not None and decodes
    assert inspect_image(jpeg(1, (320, 240)), 64).sha256 == info.sha256


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html><body>not found</body></html>", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"garbage" * 500, "not a valid image"),  # corrupt header
        (bomb_png(), "decompression bomb"),
        (jpeg(3)[: len(jpeg(3)) // 2], "not a valid image"),  # truncated: no end marker
        (encoded("PNG")[:-12], "not a valid image"),  # no IEND
    ],
    ids=["html", "corrupt-header", "bomb", "truncated-jpeg", "truncated-png"],
)
def test_header_mode_refuses(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        inspect_image(body, 0, verify="header")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP"])
def test_header_mode_refuses_each_format_cut_short(fmt: str, decodes: list[int]) -> None:
    data = encoded(fmt)
    assert inspect_image(data, 0, verify="header").format == fmt
    with pytest.raises(InvalidImageError, match="not a valid image") as refused:
        inspect_image(data[:-4], 0, verify="header")
    if fmt != "WEBP":  # libwebp reads the whole file when it opens it
        assert f"truncated (no {fmt} end marker)" in str(refused.value)
    assert decodes == []


def test_header_mode_misses_corruption_between_header_and_end() -> None:
    data = bytearray(jpeg(1, (320, 240)))
    middle = len(data) // 2
    data[middle : middle + 4] = b"\xff\xda\x00\x02"  # a stray start-of-scan in the pixels
    body = bytes(data)
    assert inspect_image(body, 0, verify="header").format == "JPEG"  # the documented miss
    with pytest.raises(InvalidImageError, match="broken data stream"):
        inspect_image(body, 0, verify="full")


def test_header_mode_refuses_data_after_a_jpeg_end_marker() -> None:
    body = jpeg(1) + b"appended data"
    assert inspect_image(body, 0, verify="full").format == "JPEG"
    with pytest.raises(InvalidImageError, match="no JPEG end marker"):
        inspect_image(body, 0, verify="header")


# ---------------------------------------------------------------------------- fetch


def test_body_shorter_than_content_length_is_worth_retrying() -> None:
    check_length(None, b"abc", "u")
    check_length(3, b"abc", "u")
    with pytest.raises(RetryableFetchError, match="body of 2 bytes, but Content-Length said 3"):
        check_length(3, b"ab", "u")


@pytest.mark.parametrize(
    ("requests_exc", "aiohttp_exc", "kind", "message"),
    [
        (requests.TooManyRedirects("x"), aiohttp.TooManyRedirects(None, ()), FetchError,
         "too many redirects (over 3)"),
        (requests.ConnectTimeout("x"), aiohttp.ServerTimeoutError("x"), RetryableFetchError,
         "timed out after 7 s"),
        (requests.ConnectionError("x"), aiohttp.ClientConnectionError("x"),
         RetryableFetchError, "connection failed: x"),
        (requests.exceptions.ChunkedEncodingError("x"), aiohttp.ClientPayloadError("x"),
         RetryableFetchError, "connection failed: x"),
        (requests.exceptions.InvalidHeader("x"), aiohttp.InvalidURL("x"), FetchError,
         "request failed"),
        (ValueError("x"), ValueError("x"), FetchError, "invalid URL: x"),
    ],
)  # fmt: skip
def test_both_libraries_map_to_the_same_failures(
    requests_exc: Exception, aiohttp_exc: Exception, kind: type[FetchError], message: str
) -> None:
    for library, exc in (("requests", requests_exc), ("aiohttp", aiohttp_exc)):
        failure = failure_for(library, exc, "http://x/1", HTTP)
        assert type(failure) is kind, library
        assert str(failure).startswith(message), (library, str(failure))


def test_a_dropped_connection_after_the_deadline_is_a_timeout() -> None:
    failure = failure_for("requests", requests.ConnectionError("x"), "u", HTTP, late=True)
    assert isinstance(failure, RetryableFetchError) and "timed out" in str(failure)
    assert failure_for("aiohttp", KeyError("a bug"), "u", HTTP) is None


def test_fetch_does_not_import_pillow() -> None:
    code = "import sys, downloader.fetch; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- end to end


def test_header_mode_run_refuses_corrupt_and_retries_truncated(tmp_path: Path) -> None:
    faults = ServerSettings(seed=3, corrupt_rate=0.2, truncate_rate=0.2, retry_after=0)
    count = 30
    key = "/320/240?lock={}"
    expected = {i: choose_fault(faults, key.format(i)) for i in range(count)}
    assert {"corrupt", "truncate"} <= set(expected.values())
    with server_thread(make_app(faults)) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        settings = make_settings("asyncio", tmp_path, url, count).replace(
            verify="header", thumbnails=ThumbnailSettings(size=0)
        )
        report = run(settings)
    by_index = {r.index: r for r in report.results}
    for index, fault in expected.items():
        result = by_index[index]
        if fault == "corrupt":
            assert result.status == "failed" and "image" in (result.error or ""), result
            assert not list(tmp_path.glob(f"{index:06d}*"))
        else:
            assert result.ok, result
            assert result.attempts == (2 if fault == "truncate" else 1), result
            with Image.open(tmp_path / (result.path or "")) as img:
                img.load()  # what header mode kept is a whole image
