"""The job service's web application: the JSON API, the event streams, files and page.

``make_app(settings)`` builds it; the store, runner and feeds start and stop with it
(``cleanup_ctx``). The handlers live in ``api``, ``streams`` and ``pages``, each with its
``RouteTableDef``; a job's body goes through the CLI's settings code (``spec.parse_body``),
so a bad one gets the CLI's one-line message.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ..errors import ConfigError
from ..netguard import is_loopback
from ..settings import Settings
from . import api, metrics, openapi, pages, streams, timeline_api
from .feed import Feeds, Topic
from .keys import EVENTS, FEEDS, LOGINS, RUNNER, SETTINGS, STORE
from .logins import LoginLimit
from .runner import Runner
from .store import Store
from .tally import tally
from .views import ApiError, refuse_a_guesser
from .webhooks import Webhooks

MAX_BODY = 1024 * 1024
OPEN_PATHS = frozenset({"/api/v1/login", "/api/v1/health"})
GUARDED = ("/api/", "/files/", "/metrics")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


_AIOHTTP_ERRORS = {
    404: "not found",
    405: "method not allowed",
    413: f"the body is over the {MAX_BODY // 1024 // 1024} MiB limit",
}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is ``{"error": "<one line>"}``."""
    try:
        return await handler(request)
    except ApiError as exc:
        extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        return error_response(exc.status, str(exc), **extra, **exc.headers)
    except ConfigError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return error_response(exc.status, _AIOHTTP_ERRORS.get(exc.status, exc.reason), **allow)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a token, /api, /files and /metrics need it (header or the page's cookie). Without one
    (loopback only), a request must come from this machine's own pages: a ``Host`` that
    names the service (a DNS-rebinding page's does not) and no foreign ``Origin`` (another
    site's page could otherwise post jobs)."""
    service = request.app[SETTINGS].service
    guarded = request.path.startswith(GUARDED) and request.path not in OPEN_PATHS
    if service.token and guarded:
        refuse_a_guesser(request)
        given = _given_token(request)
        if not hmac.compare_digest(given.encode(), service.token.encode()):
            if given:  # a guess (a page not yet logged in sends none): it counts
                request.app[LOGINS].wrong(request.remote or "")
            raise ApiError(401, "missing or wrong token")
    if not service.token and guarded:
        _check_same_origin(request, service.host)
    return await handler(request)


def _check_same_origin(request: web.Request, host: str) -> None:
    name = request.host.rsplit(":", 1)[0] if "]" not in request.host[-1:] else request.host
    if not is_loopback(name) and name.strip("[]").lower() != host.strip("[]").lower():
        raise ApiError(403, f"Host {request.host!r} is not this service's address")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise ApiError(403, f"requests from the page of {origin} are not accepted")


def _given_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:] if header[:7].lower() == "bearer " else request.cookies.get(api.COOKIE, "")


def make_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors, auth])
    app[SETTINGS] = settings
    app[EVENTS] = Topic()
    app[LOGINS] = LoginLimit()
    app.cleanup_ctx.append(_jobs)
    app.on_shutdown.append(_close_streams)
    for routes in (
        pages.routes, api.routes, streams.routes, metrics.routes, openapi.routes,
        timeline_api.routes,
    ):  # fmt: skip
        app.add_routes(routes)
    return app


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    data = app[SETTINGS].service.data
    await asyncio.to_thread(_make_folders, data)
    store = Store(data / "jobs.sqlite")
    feeds = Feeds(data / "jobs", on_new=functools.partial(tally, store))
    webhooks = Webhooks(store, app[SETTINGS].service)
    runner = Runner(store, data, app[SETTINGS].service.max_jobs, app[EVENTS], feeds, webhooks.ended)
    app[STORE], app[FEEDS], app[RUNNER] = store, feeds, runner
    webhooks.start()
    runner.start()
    try:
        yield
    finally:
        await runner.stop()
        await webhooks.stop()
        store.close()


def _make_folders(data: Path) -> None:
    for name in ("jobs", "specs"):
        (data / name).mkdir(parents=True, exist_ok=True)


async def _close_streams(app: web.Application) -> None:
    """Open event streams end now, so the server's shutdown does not wait on them."""
    app[EVENTS].close_all()
    if FEEDS in app:
        app[FEEDS].close_all()
