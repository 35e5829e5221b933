"""The JSON API's handlers: health, login, jobs (submit, list, get, cancel, retry), a
job's manifest and files. Each parses, calls the store or the runner, and answers."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..storage import MANIFEST, is_component, is_thumbnail_path
from .keys import FEEDS, LOGINS, RUNNER, SETTINGS, STORE
from .spec import JobSpec, check_priority, parse_body, split_extras, with_block_private
from .store import STATES, JobRow
from .views import ApiError, job_row, job_view, json_text, query_int, refuse_a_guesser
from .webhooks import check_url

COOKIE = "downloader_token"

routes = web.RouteTableDef()


@routes.get("/api/v1/health")
async def health(request: web.Request) -> web.Response:
    counts = request.app[STORE].counts()
    return web.json_response(
        {"status": "ok", "version": __version__, "running": counts["running"],
         "queued": counts["queued"]}
    )  # fmt: skip


@routes.post("/api/v1/login")
async def login(request: web.Request) -> web.Response:
    body = await _read_json(request)
    given = body.get("token") if isinstance(body, dict) else None
    if not isinstance(given, str):
        raise ApiError(400, 'the body must be {"token": "..."}')
    token = request.app[SETTINGS].service.token
    if token:
        refuse_a_guesser(request)
    if token and not hmac.compare_digest(given.encode(), token.encode()):
        request.app[LOGINS].wrong(request.remote or "")
        raise ApiError(401, "wrong token")
    response = web.Response(status=204)
    if token:
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
    return response


@routes.post("/api/v1/jobs")
async def create_job(request: web.Request) -> web.Response:
    body, extras = split_extras(await _read_json(request))
    settings = request.app[SETTINGS]
    spec = await asyncio.to_thread(parse_body, body, settings)
    webhook = extras.webhook
    if webhook is not None:
        webhook = await check_url(webhook, settings.service.allow_private)
    spec = JobSpec(with_block_private(spec.values, settings), spec.urls, spec.total)
    job_id = secrets.token_urlsafe(12)
    await asyncio.to_thread(_write_spec, settings.service.data / "specs", job_id, spec)
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    row = request.app[STORE].add(job_id, text, spec.total, extras.priority, webhook)
    request.app[RUNNER].submitted(row)
    return json_text(job_view(request, row), status=201)


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


@routes.get("/api/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 100, 1, 1000)
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    rows = request.app[STORE].jobs(limit, state)
    return json_text('{"jobs":[' + ",".join(job_view(request, row) for row in rows) + "]}")


@routes.get("/api/v1/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    return json_text(job_view(request, job_row(request)))


@routes.delete("/api/v1/jobs/{id}")
async def cancel_job(request: web.Request) -> web.Response:
    return _change(request, request.app[RUNNER].cancel, "{id} has already ended ({state})")


@routes.post("/api/v1/jobs/{id}/retry")
async def retry_job(request: web.Request) -> web.Response:
    refused = "{id} is {state}; only an ended job can run again"
    return _change(request, request.app[RUNNER].retry, refused)


def _change(request: web.Request, act: Callable[[JobRow], bool], refused: str) -> web.Response:
    """202 with the job as it is after ``act``, or 409 with ``refused`` (formatted with the
    job's id and state) when ``act`` says the job's state does not allow it."""
    row = job_row(request)
    if not act(row):
        raise ApiError(409, "job " + refused.format(id=row.id, state=row.state))
    return json_text(job_view(request, request.app[STORE].get(row.id) or row), 202)


@routes.patch("/api/v1/jobs/{id}")
async def change_job(request: web.Request) -> web.Response:
    row = job_row(request)
    body = await _read_json(request)
    if not isinstance(body, dict) or set(body) != {"priority"}:
        raise ApiError(400, 'the body must be {"priority": <integer>}')
    if not request.app[RUNNER].reprioritize(row, check_priority(body["priority"])):
        raise ApiError(409, f"job {row.id} is {row.state}; only a waiting job's priority changes")
    return json_text(job_view(request, request.app[STORE].get(row.id) or row))


@routes.post("/api/v1/jobs/{id}/pause")
async def pause_job(request: web.Request) -> web.Response:
    refused = "{id} is {state}; only a queued or running job pauses"
    return _change(request, request.app[RUNNER].pause, refused)


@routes.post("/api/v1/jobs/{id}/resume")
async def resume_job(request: web.Request) -> web.Response:
    refused = "{id} is {state}; only a paused job resumes"
    return _change(request, request.app[RUNNER].resume, refused)


@routes.get("/api/v1/jobs/{id}/manifest")
async def manifest(request: web.Request) -> web.StreamResponse:
    row = job_row(request)
    path = request.app[SETTINGS].service.data / "jobs" / row.id / MANIFEST
    kind = {"Content-Type": "application/x-ndjson"}
    if not await asyncio.to_thread(path.is_file):
        return web.Response(body=b"", headers=kind)
    return web.FileResponse(path, headers=kind)


@routes.get("/files/{id}/{path:.+}")
async def job_file(request: web.Request) -> web.StreamResponse:
    """An image or thumbnail of a job: only a path its manifest lists, inside its folder."""
    row = job_row(request)
    path = request.match_info["path"]
    if not (is_component(path) or is_thumbnail_path(path)):
        raise ApiError(404, "no such file")
    feed = request.app[FEEDS].get(row.id)
    await feed.poll()
    file = request.app[SETTINGS].service.data / "jobs" / row.id / path
    if not feed.lists(path) or not await asyncio.to_thread(_regular_file, file):
        raise ApiError(404, "no such file")
    return web.FileResponse(file, headers={"X-Content-Type-Options": "nosniff"})


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
