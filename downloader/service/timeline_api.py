"""``GET /api/v1/jobs/{id}/timeline``: the spans of a job's latest run (wait, cpu and
write of each image, with its process, thread and task), as the job's run writes them, so
the page draws the job's concurrency live. ``next`` is a cursor: ``?after=NEXT`` answers
only what came since (a page that polls reads each span once); ``?limit=N`` pages."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..timeline import MAX_PAGE, read_log
from .job import TIMELINE
from .keys import SETTINGS
from .views import job_row, query_int

routes = web.RouteTableDef()


@routes.get("/api/v1/jobs/{id}/timeline")
async def timeline(request: web.Request) -> web.Response:
    row = job_row(request)
    after = query_int(request, "after", 0, 0)
    limit = query_int(request, "limit", MAX_PAGE, 1)
    path = request.app[SETTINGS].service.data / "jobs" / row.id / TIMELINE
    spans, cursor = await asyncio.to_thread(read_log, path, after, min(limit, MAX_PAGE))
    return web.json_response({"spans": spans, "next": cursor, "state": row.state})

