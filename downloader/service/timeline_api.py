"""``GET /api/v1/jobs/{id}/timeline``: the spans of a job's latest run (wait, cpu and
write of each image, with its process, thread and task), as the job's run writes them, so
the page draws the job's concurrency live. ``?after=N`` skips the first N spans (a page
that polls asks only for what is new)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..timeline import read_log
from .job import TIMELINE
from .keys import SETTINGS
from .views import ApiError, job_row

routes = web.RouteTableDef()


@routes.get("/api/v1/jobs/{id}/timeline")
async def timeline(request: web.Request) -> web.Response:
    row = job_row(request)
    try:
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise ApiError(400, "after must be an integer") from None
    if after < 0:
        raise ApiError(400, "after must be 0 or more")
    path = request.app[SETTINGS].service.data / "jobs" / row.id / TIMELINE
    spans = await asyncio.to_thread(read_log, path, after)
    return web.json_response({"spans": spans, "next": after + len(spans), "state": row.state})
