"""The job service's web application: the JSON API, the event streams, files and page.

``make_app(settings)`` builds it; the store, runner and feeds start and stop with it
(``cleanup_ctx``). Handlers parse, call and answer; a job's body goes through the CLI's
settings code (``spec.parse_body``), so a bad one gets the CLI's one-line message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..errors import ConfigError
from ..settings import Settings
from .feed import Feeds, Topic
from .runner import Runner
from .spec import JobSpec, parse_body, with_block_private
from .store import STATES, JobRow, Store

MAX_BODY = 1024 * 1024
COOKIE = "downloader_token"
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
OPEN_PATHS = frozenset({"/api/v1/login", "/api/v1/health"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
RUNNER = web.AppKey("runner", Runner)
FEEDS = web.AppKey("feeds", Feeds)
EVENTS = web.AppKey("events", Topic)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
        return error_response(exc.status, str(exc), **extra)
    except ConfigError as exc:
        return error_response(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return error_response(exc.status, _AIOHTTP_ERRORS.get(exc.status, exc.reason), **allow)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a token, /api and /files need it (header or the page's cookie). Without one
    (loopback only), a request must come from this machine's own pages: a ``Host`` that
    names the service (a DNS-rebinding page's does not) and no foreign ``Origin`` (another
    site's page could otherwise post jobs)."""
    service = request.app[SETTINGS].service
    guarded = request.path.startswith(("/api/", "/files/")) and request.path not in OPEN_PATHS
    if service.token and guarded and not _has_token(request, service.token):
        raise ApiError(401, "missing or wrong token")
    if not service.token and guarded:
        _check_same_origin(request, service.host)
    return await handler(request)


def _check_same_origin(request: web.Request, host: str) -> None:
    name = (request.host.rsplit(":", 1)[0] if "]" not in request.host[-1:] else request.host)
    if name.strip("[]").lower() not in {*LOOPBACK_NAMES, host.strip("[]").lower()}:
        raise ApiError(403, f"Host {request.host!r} is not this service's address")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise ApiError(403, f"requests from the page of {origin} are not accepted")


def _has_token(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else request.cookies.get(COOKIE, "")
    return hmac.compare_digest(given.encode(), token.encode())


# ---------------------------------------------------------------------------- the app


def make_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors, auth])
    app[SETTINGS] = settings
    app[EVENTS] = Topic()
    app.cleanup_ctx.append(_jobs)
    app.on_shutdown.append(_close_streams)
    app.add_routes(_routes())
    return app


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    data = app[SETTINGS].service.data
    await asyncio.to_thread(_make_folders, data)
    store = Store(data / "jobs.sqlite")
    feeds = Feeds(data / "jobs")
    runner = Runner(store, data, app[SETTINGS].service.max_jobs, app[EVENTS], feeds)
    app[STORE], app[FEEDS], app[RUNNER] = store, feeds, runner
    runner.start()
    try:
        yield
    finally:
        await runner.stop()
        store.close()


def _make_folders(data: Path) -> None:
    for name in ("jobs", "specs"):
        (data / name).mkdir(parents=True, exist_ok=True)


async def _close_streams(app: web.Application) -> None:
    """Open event streams end now, so the server's shutdown does not wait on them."""
    app[EVENTS].close_all()
    if FEEDS in app:
        app[FEEDS].close_all()


# ---------------------------------------------------------------------------- handlers


def _json(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="application/json")


def job_row(request: web.Request) -> JobRow:
    job_id = request.match_info["id"]
    row = request.app[STORE].get(job_id) if JOB_ID.fullmatch(job_id) else None
    if row is None:
        raise ApiError(404, f"no job {job_id!r}")
    return row


async def health(request: web.Request) -> web.Response:
    counts = request.app[STORE].counts()
    return web.json_response(
        {"status": "ok", "version": __version__, "running": counts["running"],
         "queued": counts["queued"]}
    )  # fmt: skip


async def login(request: web.Request) -> web.Response:
    body = await _read_json(request)
    given = body.get("token") if isinstance(body, dict) else None
    if not isinstance(given, str):
        raise ApiError(400, 'the body must be {"token": "..."}')
    token = request.app[SETTINGS].service.token
    if token and not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "wrong token")
    response = web.Response(status=204)
    if token:
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
    return response


async def create_job(request: web.Request) -> web.Response:
    body = await _read_json(request)
    settings = request.app[SETTINGS]
    spec = await asyncio.to_thread(parse_body, body, settings)
    spec = JobSpec(with_block_private(spec.values, settings), spec.urls, spec.total)
    job_id = secrets.token_urlsafe(12)
    await asyncio.to_thread(_write_spec, settings.service.data / "specs", job_id, spec)
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    row = request.app[STORE].add(job_id, text, spec.total)
    request.app[RUNNER].submitted(row)
    return _json(request.app[RUNNER].render(row), status=201)


def _write_spec(folder: Path, job_id: str, spec: JobSpec) -> None:
    if spec.urls is not None:
        (folder / f"{job_id}.urls").write_text("".join(f"{u}\n" for u in spec.urls), "utf-8")
    (folder / f"{job_id}.json").write_text(spec.to_json(), "utf-8")


async def _read_json(request: web.Request) -> Any:
    # Only application/json: a browser sends any other type from any site without asking
    # (a "simple" request); this one needs a CORS preflight, which the service never grants.
    if request.content_type != "application/json":
        raise ApiError(415, "send the body as Content-Type: application/json")
    raw = await request.read()

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None


async def list_jobs(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise ApiError(400, "limit must be 1 to 1000")
    state = query.get("state") or None
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    runner = request.app[RUNNER]
    rows = request.app[STORE].jobs(limit, state)
    return _json('{"jobs":[' + ",".join(runner.render(row) for row in rows) + "]}")


async def get_job(request: web.Request) -> web.Response:
    return _json(request.app[RUNNER].render(job_row(request)))


async def cancel_job(request: web.Request) -> web.Response:
    row = job_row(request)
    if not request.app[RUNNER].cancel(row):
        raise ApiError(409, f"job {row.id} has already ended ({row.state})")
    return _json(request.app[RUNNER].render(request.app[STORE].get(row.id) or row), 202)


async def retry_job(request: web.Request) -> web.Response:
    row = job_row(request)
    if not request.app[RUNNER].retry(row):
        raise ApiError(409, f"job {row.id} is {row.state}; only an ended job can run again")
    return _json(request.app[RUNNER].render(request.app[STORE].get(row.id) or row), 202)


async def manifest(request: web.Request) -> web.StreamResponse:
    row = job_row(request)
    path = request.app[SETTINGS].service.data / "jobs" / row.id / "manifest.jsonl"
    kind = {"Content-Type": "application/x-ndjson"}
    if not await asyncio.to_thread(path.is_file):
        return web.Response(body=b"", headers=kind)
    return web.FileResponse(path, headers=kind)


async def job_file(request: web.Request) -> web.StreamResponse:
    """An image or thumbnail of a job: only a path its manifest lists, inside its folder."""
    row = job_row(request)
    path = request.match_info["path"]
    if not _relative_file(path):
        raise ApiError(404, "no such file")
    feed = request.app[FEEDS].get(row.id)
    await feed.poll()
    file = request.app[SETTINGS].service.data / "jobs" / row.id / path
    if not feed.lists(path) or not await asyncio.to_thread(_regular_file, file):
        raise ApiError(404, "no such file")
    return web.FileResponse(file, headers={"X-Content-Type-Options": "nosniff"})


def _relative_file(path: str) -> bool:
    parts = path.split("/")
    if len(parts) == 2 and parts[0] == "thumbnails":
        parts = parts[1:]
    return len(parts) == 1 and all(
        part and not part.startswith(".") and "\\" not in part and "\0" not in part
        for part in parts
    )


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _routes() -> list[web.RouteDef]:
    """Every route, in one table (the stream and page handlers live beside this module)."""
    from .pages import index, web_file
    from .streams import all_events, job_events

    return [
        web.get("/", index),
        web.get("/web/{name}", web_file),
        web.post("/api/v1/login", login),
        web.get("/api/v1/health", health),
        web.post("/api/v1/jobs", create_job),
        web.get("/api/v1/jobs", list_jobs),
        web.get("/api/v1/events", all_events),
        web.get("/api/v1/jobs/{id}", get_job),
        web.delete("/api/v1/jobs/{id}", cancel_job),
        web.post("/api/v1/jobs/{id}/retry", retry_job),
        web.get("/api/v1/jobs/{id}/manifest", manifest),
        web.get("/api/v1/jobs/{id}/events", job_events),
        web.get("/files/{id}/{path:.+}", job_file),
    ]
