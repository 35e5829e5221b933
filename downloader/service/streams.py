"""Server-Sent Events (``aiohttp_sse``): the job list's changes, and one job's results as
they come.

A job's stream first replays every result its feed holds after the client's
``Last-Event-ID``, then the live ones: the replay is copied and the listener added in one
step of the event loop, so nothing falls in between and nothing comes twice. The
library's pings keep proxies from closing an idle stream; a stream ends when the client
goes, at the job's ``end``, or when the service stops (``Topic.close_all``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .feed import Event
from .keys import EVENTS, FEEDS, RUNNER, STORE
from .views import ApiError, job_json, job_row

HEARTBEAT_S = 15.0
SEP = "\n"  # between an event's lines; the library's default is CRLF
YIELD_EVERY = 500  # events of a replay sent between two turns of the event loop

routes = web.RouteTableDef()


def _stream() -> EventSourceResponse:
    return EventSourceResponse(sep=SEP, ping_interval=HEARTBEAT_S)


async def _send(response: EventSourceResponse, events: Iterable[Event]) -> None:
    for count, event in enumerate(events, 1):
        data = job_json(event.job) if event.job is not None else event.data
        await response.send(data, id=event.id, event=event.kind)
        if count % YIELD_EVERY == 0:  # a write to a fast reader never waits: let others run
            await asyncio.sleep(0)


async def _pump(response: EventSourceResponse, queue: asyncio.Queue[Event]) -> None:
    """Send events as they come until ``end`` (sent) or ``close`` (not sent)."""
    while True:
        event = await queue.get()
        if event.kind == "close":
            return
        await _send(response, [event])
        if event.kind == "end":
            return


@routes.get("/api/v1/jobs/{id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    job_id = job_row(request).id  # a 404 before the stream opens
    response = _stream()
    # ConnectionResetError: the client left; TimeoutError: it stopped reading (the
    # library's send timeout). Either way its stream is over.
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        await response.prepare(request)
        async with response:
            await _follow(request, response, job_id)
    if not response.prepared:  # pragma: no cover - the client left before the headers
        raise ApiError(499, "client gone")
    return response


async def _follow(request: web.Request, response: EventSourceResponse, job_id: str) -> None:
    app = request.app
    feed = app[FEEDS].get(job_id)
    row = app[STORE].get(job_id)
    with feed.topic.subscribe() as queue:
        backlog = feed.replay((response.last_event_id or "").strip())
        await _send(response, backlog)
        await feed.poll()  # what the feed had not read yet goes to the queue
        if row is None or not row.final:
            await _pump(response, queue)
            return
        pending = [queue.get_nowait() for _ in range(queue.qsize())]
        results = [event for event in pending if event.kind == "result"]
        row = app[STORE].get(job_id) or row
        await _send(response, [*results, Event("end", job=app[RUNNER].snapshot(row))])


@routes.get("/api/v1/events")
async def all_events(request: web.Request) -> web.StreamResponse:
    response = _stream()
    with (
        request.app[EVENTS].subscribe() as queue,
        contextlib.suppress(ConnectionResetError, TimeoutError),
    ):
        await response.prepare(request)
        async with response:
            await _pump(response, queue)
    if not response.prepared:  # pragma: no cover
        raise ApiError(499, "client gone")
    return response
