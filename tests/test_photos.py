"""The built-in server's photos: deterministic, told apart, sized like loremflickr's."""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image, ImageChops, ImageStat

from downloader.photos import MAX_KEYWORDS_CHARS, clean_keywords, render_photo
from downloader.server import make_app, server_thread
from downloader.settings import ServerSettings


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def difference(a: bytes, b: bytes) -> float:
    """Mean absolute difference per channel, 0..255."""
    return sum(ImageStat.Stat(ImageChops.difference(decode(a), decode(b))).mean) / 3


def test_same_inputs_same_bytes() -> None:
    first = render_photo(320, 240, 7, 1, keywords="cat")
    render_photo.cache_clear()
    assert render_photo(320, 240, 7, 1, keywords="cat") == first


@pytest.mark.parametrize(
    ("other", "why"),
    [
        ({"photo": 8}, "another number"),
        ({"seed": 2}, "another seed"),
        ({"keywords": "dog"}, "other keywords"),
    ],
)
def test_photos_differ_visibly(other: dict[str, object], why: str) -> None:
    base: dict[str, object] = {"photo": 7, "seed": 1, "keywords": "cat"}
    a = render_photo(320, 240, **base)  # type: ignore[arg-type]
    b = render_photo(320, 240, **(base | other))  # type: ignore[arg-type]
    assert difference(a, b) > 10, why


def test_one_photo_looks_the_same_at_every_size() -> None:
    small = decode(render_photo(160, 120, 3, 0, keywords="sea"))
    large = decode(render_photo(640, 480, 3, 0, keywords="sea")).resize((160, 120))
    other = decode(render_photo(160, 120, 4, 0, keywords="sea"))
    same = sum(ImageStat.Stat(ImageChops.difference(small, large)).mean) / 3
    apart = sum(ImageStat.Stat(ImageChops.difference(small, other)).mean) / 3
    assert same < apart / 2


@pytest.mark.parametrize(
    ("size", "low_kb", "high_kb"), [((320, 240), 15, 25), ((640, 480), 45, 60)]
)
def test_sizes_stay_near_loremflickrs(size: tuple[int, int], low_kb: int, high_kb: int) -> None:
    for photo in range(5):
        kb = len(render_photo(*size, photo, 0, keywords="cat, dog")) / 1024
        assert low_kb <= kb <= high_kb, (size, photo, kb)


def test_gray_and_tiny_photos_decode() -> None:
    assert decode(render_photo(1, 1, 0, 0)).size == (1, 1)
    with Image.open(io.BytesIO(render_photo(40, 30, 0, 0, gray=True))) as img:
        assert img.mode == "L"


def test_keywords_are_cleaned() -> None:
    assert clean_keywords(" cat,,dog ,\x00x") == "cat,dog"
    assert len(clean_keywords("a" * 500)) == MAX_KEYWORDS_CHARS


def test_server_draws_the_keywords_of_the_url() -> None:
    settings = ServerSettings(seed=5, pool_size=10)
    with server_thread(make_app(settings)) as server:
        resp = requests.get(f"{server.base_url}/64/48/cat,dog/all?lock=13", timeout=5)
    assert resp.status_code == 200
    final = urlsplit(resp.url)
    assert final.path == "/cache/resized/3_c_64_48_nofilter.jpg"
    assert parse_qs(final.query) == {"keywords": ["cat,dog"]}
    assert resp.content == render_photo(64, 48, 3, 5, keywords="cat,dog")
    assert resp.content != render_photo(64, 48, 3, 5)
