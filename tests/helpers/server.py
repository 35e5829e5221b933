"""The built-in server as the tests use it: on a loopback port with hostile test routes
(``/t/{token}/case/{i}``, one behaviour per index of ``CASES``), its request counters, and
the images it serves."""

from __future__ import annotations

import json
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from aiohttp import web

from downloader.server import RunningServer, make_app, render_photo
from downloader.settings import ServerSettings

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

    def stats(self) -> Counter[str]:
        return server_stats(self.base)


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


def server_stats(server: RunningServer | str) -> Counter[str]:
    """The built-in server's request counters (``/__stats``): entries, faults, paths."""
    base = server if isinstance(server, str) else server.base_url
    with urllib.request.urlopen(f"{base}/__stats", timeout=10) as resp:
        return Counter(json.loads(resp.read()))


def entry_key(index: int) -> str:
    """The path and query the built-in server counts for image ``index`` (320x240)."""
    return f"/320/240?lock={index}"


class CountingRoute:
    """The built-in server plus one route, ``route`` (with an ``{i}``), that counts each
    request by its index and answers as the subclass's ``answer`` says."""

    route: str

    def __init__(self) -> None:
        self.hits: Counter[int] = Counter()

    async def answer(self, index: int) -> web.Response:
        raise NotImplementedError

    def app(self) -> web.Application:
        app = make_app(ServerSettings(seed=1))

        async def counted(request: web.Request) -> web.Response:
            index = int(request.match_info["i"])
            self.hits[index] += 1
            return await self.answer(index)

        app.router.add_get(self.route, counted)
        return app
