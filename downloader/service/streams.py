"""Server-Sent Events: the job list's changes, and one job's results as they come.

A job's stream first replays every result its feed holds, then the live ones: the replay
is copied and the listener added in one step of the event loop, so nothing falls in
between and nothing comes twice. Heartbeat comments keep proxies from closing an idle
stream; a stream ends when the client goes, at the job's ``end``, or when the service
stops (``Topic.close_all``).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from .app import EVENTS, FEEDS, RUNNER, STORE, ApiError, job_row
from .feed import Event

HEARTBEAT_S = 15.0


def _frame(event: Event) -> bytes:
    head = f"id: {event.id}\n" if event.id is not None else ""
    return f"{head}event: {event.kind}\ndata: {event.data}\n\n".encode()


async def _open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def _pump(response: web.StreamResponse, queue: asyncio.Queue[Event]) -> None:
    """Write events as they come (all waiting ones at once) until ``end`` or ``close``."""
    while True:
        try:
            events = [await asyncio.wait_for(queue.get(), HEARTBEAT_S)]
        except TimeoutError:
            await response.write(b": ping\n\n")
            continue
        while not queue.empty():
            events.append(queue.get_nowait())
        stop = next((i for i, e in enumerate(events) if e.kind in ("end", "close")), None)
        batch = events if stop is None else events[: stop + 1]
        await response.write(b"".join(_frame(e) for e in batch if e.kind != "close"))
        if stop is not None:
            return


async def job_events(request: web.Request) -> web.StreamResponse:
    row = job_row(request)
    feed = request.app[FEEDS].get(row.id)
    response: web.StreamResponse | None = None
    with feed.topic.subscribe() as queue, contextlib.suppress(ConnectionResetError):
        backlog = feed.replay(request.headers.get("Last-Event-ID", "").strip())
        ended = row.final
        response = await _open(request)
        for start in range(0, len(backlog), 500):
            await response.write(b"".join(_frame(e) for e in backlog[start : start + 500]))
        await feed.poll()  # what the feed had not read yet goes to the queue
        if ended:
            pending = [queue.get_nowait() for _ in range(queue.qsize())]
            results = [e for e in pending if e.kind == "result"]
            row = request.app[STORE].get(row.id) or row
            end = Event("end", request.app[RUNNER].render(row))
            await response.write(b"".join(_frame(e) for e in [*results, end]))
        else:
            await _pump(response, queue)
    if response is None:  # pragma: no cover - the client left before the headers
        raise ApiError(499, "client gone")
    return response


async def all_events(request: web.Request) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    with request.app[EVENTS].subscribe() as queue, contextlib.suppress(ConnectionResetError):
        response = await _open(request)
        await _pump(response, queue)
    if response is None:  # pragma: no cover
        raise ApiError(499, "client gone")
    return response
