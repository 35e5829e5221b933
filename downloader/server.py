"""A loremflickr-compatible image server (aiohttp.web), for offline runs, tests and benchmarks.

URL forms, as on loremflickr.com: ``/{w}/{h}``, ``/{w}/{h}/{keywords}``,
``/{w}/{h}/{keywords}/all|any``, ``/g/...`` for grayscale, ``?lock=N`` for a fixed photo.
Each answers with a 302 to ``/cache/resized/<id>_{w}_{h}_nofilter.jpg``, which serves a real
JPEG: a numbered scene with the keywords written on it (``photos.render_photo``), generated
once and cached (the keywords ride along in the redirect's query). Simulated latency applies
once per image, to the first request, so the ideal wall time of n images is
n x latency / concurrency.

Fault injection (``ServerSettings.*_rate``) breaks a reproducible share of entry requests:
which fault a URL gets depends only on the seed and its path and query (``choose_fault``).
Transient faults (fail, throttle, reset, truncate, stall, slow) hit the first request for a
URL only; corrupt hits every one. ``/__stats`` counts them as ``fault:<kind>``, and stalls
that ended early (client gone, server shutting down) as ``stall:abandoned``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .errors import ConfigError
from .photos import clean_keywords, render_photo
from .settings import ServerSettings

MAX_SIDE = 4000
_CACHE_NAME = re.compile(r"(?P<photo>\d+)_(?P<tone>[cg])_(?P<w>\d+)_(?P<h>\d+)_nofilter\.jpg")


class Stats:
    """Request counts by kind and by path, for tests and benchmarks."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def hit(self, *keys: str) -> None:
        for key in keys:
            self.counts[key] += 1


STATS: web.AppKey[Stats] = web.AppKey("stats", Stats)
CONFIG: web.AppKey[ServerSettings] = web.AppKey("config", ServerSettings)
RNG: web.AppKey[random.Random] = web.AppKey("rng", random.Random)


# ---------------------------------------------------------------------------- fault injection

PERSISTENT_FAULTS = frozenset({"corrupt"})
JPEG_MAGIC = b"\xff\xd8\xff\xe0"
_POLL_S = 0.05  # how often a stalled handler checks whether its client is still there
_SLOW_PIECES = 20  # a slow body is sent in this many pieces, evenly spaced over slow_ms
_TRUNCATE_EXTRA = 1024  # bytes a truncated body declares beyond what it sends


def choose_fault(config: ServerSettings, key: str) -> str | None:
    """The fault for ``key`` (a request's path and query), or None: one draw seeded with
    ``(seed, key)`` against the cumulative rates, so it is the same on every run."""
    rates = config.fault_rates()
    if not any(rate > 0 for _, rate in rates):
        return None
    draw = random.Random(f"{config.seed}:{key}").random()
    edge = 0.0
    for kind, rate in rates:
        edge += rate
        if draw < edge:
            return kind
    return None


class Faults:
    """Which URLs have had their transient fault, and whether the server is shutting down."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.closing = False

    def pick(self, config: ServerSettings, key: str) -> str | None:
        """The fault to inject now: transient ones only on the first request for ``key``."""
        kind = choose_fault(config, key)
        if kind is None or kind in PERSISTENT_FAULTS:
            return kind
        if key in self.seen:
            return None
        self.seen.add(key)
        return kind


FAULTS: web.AppKey[Faults] = web.AppKey("faults", Faults)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _drop(request: web.Request) -> None:
    """Close the connection under a response: the bytes already written are flushed, then
    the client sees EOF before the declared Content-Length."""
    transport = request.transport
    if transport is not None:
        transport.close()


async def _stall(request: web.Request) -> bool:
    """Send nothing for ``stall_s`` seconds without blocking the loop. False when the client
    went away or the server began shutting down first."""
    app = request.app
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app[CONFIG].stall_s
    while (left := deadline - loop.time()) > 0:
        if _client_gone(request) or app[FAULTS].closing:
            return False
        await asyncio.sleep(min(_POLL_S, left))
    return True


async def _send(
    request: web.Request, body: bytes, declared: int, pieces: int = 1, spread_s: float = 0.0
) -> web.StreamResponse:
    """200 image/jpeg declaring ``declared`` bytes, ``body`` written in ``pieces`` spaced over
    ``spread_s`` seconds. When ``body`` falls short of ``declared``, the connection drops."""
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    resp.content_length = declared
    await resp.prepare(request)
    step = max(1, -(-len(body) // pieces))
    try:
        for start in range(0, len(body), step):
            if spread_s > 0:
                await asyncio.sleep(spread_s / pieces)
            await resp.write(body[start : start + step])
    except ConnectionError:  # the client went away mid-body
        return resp
    if len(body) < declared:
        _drop(request)
    else:
        await resp.write_eof()
    return resp


def _garbage(seed: int, key: str, size: int) -> bytes:
    """JPEG magic bytes then deterministic noise: looks like a JPEG, never decodes."""
    return JPEG_MAGIC + random.Random(f"{seed}:{key}:corrupt").randbytes(max(0, size - 4))


async def _faulty(request: web.Request, kind: str, photo: bytes) -> web.StreamResponse:
    """The broken answer of one fault kind (all but stall), in place of the redirect."""
    cfg = request.app[CONFIG]
    retry = {"Retry-After": str(cfg.retry_after)}
    if kind == "fail":
        raise web.HTTPServiceUnavailable(headers=retry, text="injected fault: fail")
    if kind == "throttle":
        raise web.HTTPTooManyRequests(headers=retry, text="injected fault: throttle")
    if kind == "reset":
        return await _send(request, photo[: len(photo) // 2], len(photo))
    if kind == "truncate":
        return await _send(request, photo, len(photo) + _TRUNCATE_EXTRA)
    if kind == "slow":
        return await _send(request, photo, len(photo), _SLOW_PIECES, cfg.slow_ms / 1000)
    if kind == "corrupt":
        body = _garbage(cfg.seed, request.path_qs, len(photo))
        return web.Response(body=body, content_type="image/jpeg")
    raise AssertionError(f"unknown fault kind {kind!r}")


async def _on_shutdown(app: web.Application) -> None:
    app[FAULTS].closing = True


# ---------------------------------------------------------------------------- routes


def _size(request: web.Request) -> tuple[int, int]:
    try:
        width, height = int(request.match_info["w"]), int(request.match_info["h"])
    except ValueError:
        raise web.HTTPBadRequest(text="width and height must be integers") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise web.HTTPBadRequest(text=f"width and height must be 1..{MAX_SIDE}")
    return width, height


async def _latency(app: web.Application) -> None:
    cfg = app[CONFIG]
    delay = cfg.latency_ms + (app[RNG].uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0.0)
    if delay > 0:
        await asyncio.sleep(delay / 1000)


async def entry(request: web.Request) -> web.StreamResponse:
    """``/{w}/{h}[/keywords[/all|any]]`` and ``/g/...``: redirect to one photo of the pool."""
    app = request.app
    app[STATS].hit("entry", request.path_qs)
    width, height = _size(request)
    cfg = app[CONFIG]
    lock = request.query.get("lock")
    if lock is not None and lock.isascii() and lock.isdigit() and len(lock) <= 18:
        photo = int(lock) % cfg.pool_size
    else:
        photo = app[RNG].randrange(cfg.pool_size)
    tone = "g" if request.path.startswith("/g/") else "c"
    keywords = clean_keywords(request.match_info.get("rest", "").split("/", 1)[0])
    await _latency(app)
    fault = app[FAULTS].pick(cfg, request.path_qs)
    if fault is not None:
        app[STATS].hit(f"fault:{fault}")
    if fault == "stall" and not await _stall(request):
        app[STATS].hit("stall:abandoned")
        raise web.HTTPServiceUnavailable(text="stalled request abandoned")
    if fault is not None and fault != "stall":
        photo_body = render_photo(width, height, photo, cfg.seed, tone == "g", keywords)
        return await _faulty(request, fault, photo_body)
    query = "?" + urlencode({"keywords": keywords}) if keywords else ""
    raise web.HTTPFound(f"/cache/resized/{photo}_{tone}_{width}_{height}_nofilter.jpg{query}")


async def cached(request: web.Request) -> web.StreamResponse:
    app = request.app
    app[STATS].hit("image", request.path)
    match = _CACHE_NAME.fullmatch(request.match_info["name"])
    if not match:
        raise web.HTTPNotFound(text="no such image")
    width, height = int(match["w"]), int(match["h"])
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise web.HTTPNotFound(text="no such image")
    photo = int(match["photo"]) % app[CONFIG].pool_size
    keywords = clean_keywords(request.query.get("keywords", ""))
    body = render_photo(width, height, photo, app[CONFIG].seed, match["tone"] == "g", keywords)
    return web.Response(body=body, content_type="image/jpeg")


async def stats(request: web.Request) -> web.Response:
    """Request counts, for tests and benchmarks that assert what was (not) fetched."""
    return web.json_response(dict(request.app[STATS].counts))


def make_app(config: ServerSettings | None = None) -> web.Application:
    config = config or ServerSettings()
    app = web.Application()
    app[CONFIG] = config
    app[STATS] = Stats()
    app[RNG] = random.Random(config.seed)
    app[FAULTS] = Faults()
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/__stats", stats)
    app.router.add_get("/cache/resized/{name}", cached)
    for prefix in ("", "/g"):
        app.router.add_get(prefix + r"/{w:\d+}/{h:\d+}", entry)
        app.router.add_get(prefix + r"/{w:\d+}/{h:\d+}/{rest:.*}", entry)
    return app


def serve(config: ServerSettings, ready: Any = None) -> None:
    """Run the server until cancelled; ``ready(port)`` is called once it listens."""

    async def main() -> None:
        runner = web.AppRunner(make_app(config), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1]
        if ready is not None:
            ready(port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# ---------------------------------------------------------------------------- run it elsewhere


@dataclass
class RunningServer:
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _child(config: ServerSettings, conn: Any, parent_pid: int) -> None:
    from .children import child_init

    child_init(parent_pid)

    def ready(port: int) -> None:
        conn.send(port)
        conn.close()

    serve(config, ready)


@contextlib.contextmanager
def server_process(config: ServerSettings) -> Iterator[RunningServer]:
    """The server in a child process (it never shares a GIL with the run it serves), on a
    free loopback port unless ``config.port`` says otherwise; stopped on exit."""
    from .children import mp_context

    ctx: Any = mp_context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(config, child, os.getpid()), daemon=True, name="image-server"
    )
    proc.start()
    child.close()
    try:
        try:
            if not parent.poll(30):
                raise EOFError
            port = parent.recv()
        except EOFError:
            raise ConfigError(
                f"the built-in image server could not listen on {config.host} (see server.host)"
            ) from None
        yield RunningServer(config.host, port)
    finally:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():  # pragma: no cover
            proc.kill()


SHUTDOWN_GRACE_S = 0.5


@contextlib.contextmanager
def server_thread(app: web.Application, host: str = "127.0.0.1") -> Iterator[RunningServer]:
    """The server on a background thread with its own loop (tests): yields once listening."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        # A short grace at shutdown: a handler still sleeping out a long latency or a stall
        # is cancelled rather than waited for (the client that asked for it has gone).
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        site = web.TCPSite(runner, host, 0, backlog=1024)
        await site.start()
        box["runner"] = runner
        box["port"] = runner.addresses[0][1]
        started.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(box["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=main, daemon=True, name="image-server")
    thread.start()
    if not started.wait(30):
        raise RuntimeError("test image server did not start")
    try:
        yield RunningServer(host, box["port"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
