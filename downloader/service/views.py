"""What the API answers: a job as JSON, the job a path names, and the errors handlers
raise (``ApiError``, made ``{"error": "<one line>"}`` by ``app.errors``)."""

from __future__ import annotations

import json
import re

from aiohttp import web

from .keys import LOGINS, RUNNER, STORE
from .store import JobRow

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def job_json(row: JobRow) -> str:
    """The job object as JSON text (``spec`` is the body as sent, stored as JSON, less
    ``priority`` and ``webhook``, which are the job's own fields; ``delivery`` is how its
    webhook's delivery went, stored as JSON)."""
    head = {
        "id": row.id, "state": row.state, "ok": row.ok, "failed": row.failed,
        "total": row.total, "created_at": row.created_at, "started_at": row.started_at,
        "finished_at": row.finished_at, "images_per_s": row.images_per_s,
        "summary": row.summary, "error": row.error, "priority": row.priority,
        "webhook": row.webhook,
    }  # fmt: skip
    delivery = row.delivery or "null"
    return (
        json.dumps(head, separators=(",", ":"))[:-1] + f',"delivery":{delivery},"spec":{row.body}}}'
    )


def job_view(request: web.Request, row: JobRow) -> str:
    """The job as JSON, with the counts of its run so far when it is running."""
    return job_json(request.app[RUNNER].snapshot(row))


def json_text(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="application/json")


def job_row(request: web.Request) -> JobRow:
    """The job of the path's ``{id}``, or a 404."""
    job_id = request.match_info["id"]
    row = request.app[STORE].get(job_id) if JOB_ID.fullmatch(job_id) else None
    if row is None:
        raise ApiError(404, f"no job {job_id!r}")
    return row


def refuse_a_guesser(request: web.Request) -> None:
    """429 for an address that gave ``logins.MAX_WRONG`` wrong tokens within the window,
    whether over the login or as a bearer token: the limit must hold on every door."""
    wait = request.app[LOGINS].retry_after(request.remote or "")
    if wait is not None:
        raise ApiError(
            429, f"too many wrong tokens; try again in {wait} s", **{"Retry-After": str(wait)}
        )


def query_int(
    request: web.Request, name: str, default: int, low: int, high: int | None = None
) -> int:
    """The integer query parameter ``name`` (``default`` when absent), or a 400 saying why."""
    try:
        value = int(request.query.get(name, str(default)))
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low} or more" if high is None else f"{low} to {high}"
        raise ApiError(400, f"{name} must be {bounds}")
    return value
