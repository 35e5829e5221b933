"""Shared fixtures: the built-in server on a loopback port, plus hostile test routes."""

from __future__ import annotations

import io
import json
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from downloader.backends import BACKENDS as REGISTRY
from downloader.backends import get_backend
from downloader.errors import ConfigError
from downloader.server import RunningServer, make_app, render_photo, server_thread
from downloader.settings import (
    DaskSettings,
    HttpSettings,
    ServerSettings,
    Settings,
    ThumbnailSettings,
)

# The backend matrix is the registry's: a new backend cannot escape the contract tests.
# Backends that need an extra (dask: a LocalCluster of 2 workers, slow to start) run the
# contract suite when the extra is installed, and are left out of the longer suites.
BACKENDS = [name for name, (_, _, extra) in REGISTRY.items() if extra is None]


def _installed(name: str) -> bool:
    try:
        get_backend(name)
    except ConfigError:  # its extra is not installed
        return False
    return True


CONTRACT_BACKENDS = BACKENDS + [n for n in REGISTRY if n not in BACKENDS and _installed(n)]
OVERSIZE_CAP = 200_000


@lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A tiny PNG declaring 12000x12000 pixels: past Pillow's decompression-bomb limit."""
    width = height = 12000
    raw = (b"\x00" + b"\x00" * (width // 8)) * height  # 1-bit rows, filter byte 0
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x01\x00\x00\x00\x00"

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def jpeg(seed: int, size: tuple[int, int] = (200, 150)) -> bytes:
    return render_photo(size[0], size[1], seed, seed=99)


@dataclass
class ImageServer:
    server: RunningServer
    flaky_hits: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.server.base_url

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.base}/__stats", timeout=5) as resp:
            counts: dict[str, int] = json.loads(resp.read())
            return counts


# Index -> what the hostile route /t/{token}/case/{i} does, and what we expect.
CASES = [
    "good",
    "traversal",
    "same-name-a",
    "same-name-b",
    "long-name",
    "html",
    "corrupt",
    "bomb",
    "oversize",
    "oversize-chunked",
    "not-found",
    "redirect-loop",
    "flaky",
    "truncated-jpeg",
]
OK_CASES = {"good", "traversal", "same-name-a", "same-name-b", "long-name", "flaky"}


def add_hostile_routes(app: web.Application, state: ImageServer) -> None:
    async def case(request: web.Request) -> web.StreamResponse:
        token, index = request.match_info["token"], int(request.match_info["i"])
        name = CASES[index % len(CASES)]
        base = f"/t/{token}"
        if name == "good":
            return web.Response(body=jpeg(1), content_type="image/jpeg")
        if name == "traversal":
            raise web.HTTPFound(f"{base}/files/..%2F..%2Fx.jpg")
        if name == "same-name-a":
            raise web.HTTPFound(f"{base}/a/photo.jpg")
        if name == "same-name-b":
            raise web.HTTPFound(f"{base}/b/photo.jpg")
        if name == "long-name":
            raise web.HTTPFound(f"{base}/files/{'n' * 300}.jpg")
        if name == "html":
            return web.Response(text="<html>hi</html>", content_type="text/html")
        if name == "corrupt":
            return web.Response(
                body=b"\xff\xd8\xff\xe0" + b"garbage" * 500, content_type="image/jpeg"
            )
        if name == "bomb":
            return web.Response(body=bomb_png(), content_type="image/png")
        if name == "oversize":
            return web.Response(
                body=b"\xff\xd8\xff" + b"x" * OVERSIZE_CAP, content_type="image/jpeg"
            )
        if name == "oversize-chunked":
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(OVERSIZE_CAP // 10_000 + 5):
                await resp.write(b"\xff" * 10_000)
            await resp.write_eof()
            return resp
        if name == "not-found":
            raise web.HTTPNotFound()
        if name == "redirect-loop":
            raise web.HTTPFound(request.path)
        if name == "flaky":
            hits = state.flaky_hits[request.path] = state.flaky_hits.get(request.path, 0) + 1
            if hits == 1:
                raise web.HTTPServiceUnavailable(headers={"Retry-After": "0"})
            return web.Response(body=jpeg(2), content_type="image/jpeg")
        if name == "truncated-jpeg":
            body = jpeg(3)
            return web.Response(body=body[: len(body) // 2], content_type="image/jpeg")
        raise AssertionError(name)

    async def files(request: web.Request) -> web.Response:
        return web.Response(body=jpeg(4), content_type="image/jpeg")

    async def named(request: web.Request) -> web.Response:
        seed = 5 if request.match_info["who"] == "a" else 6
        return web.Response(body=jpeg(seed), content_type="image/jpeg")

    app.router.add_get("/t/{token}/case/{i}", case)
    app.router.add_get("/t/{token}/files/{name:.*}", files)
    app.router.add_get("/t/{token}/{who}/photo.jpg", named)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    app = make_app(ServerSettings(seed=7, pool_size=10))
    state = ImageServer(server=RunningServer("127.0.0.1", 0))
    add_hostile_routes(app, state)
    with server_thread(app) as running:
        state.server = running
        yield state


def make_settings(backend: str, out: Path, url: str, count: int, **http: object) -> Settings:
    return Settings(
        backend=backend,
        count=count,
        url=url,
        out=out,
        progress=False,
        http=HttpSettings(
            **{
                "concurrency": 4,
                "timeout": 10.0,
                "retries": 2,
                "backoff": 0.01,
                "max_backoff": 0.05,
                **http,  # type: ignore[arg-type]
            }
        ),
        thumbnails=ThumbnailSettings(size=64),
        dask=DaskSettings(workers=2, shard_size=4),
    )


def decode_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds`` (a deadline, not a timing)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.02)
