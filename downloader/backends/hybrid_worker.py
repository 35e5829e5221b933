"""hybrid's worker process: the asyncio pipeline over the jobs its parent sends.

Everything for a job happens here, on this process's own core: fetch, decode, thumbnail,
atomic write. Only ``hybrid_messages`` records cross the pipes, never image bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

from ..children import child_init
from ..jobs import Job
from ..placement import placement
from ..politeness import HostGate
from ..result import Result
from ..settings import Settings
from .hybrid_messages import Done, Failed, Jobs, NoMoreJobs, Pause, Results, Stop, ToParent

BATCH = 32  # results per message at most; fewer after FLUSH_S
FLUSH_S = 0.005
PARENT_GONE = (BrokenPipeError, ConnectionResetError, EOFError)


def serve(jobs_in: Connection, results_out: Connection, settings: Settings, parent: int) -> None:
    """A worker process's body (the target of its ``Process``)."""
    from .aio import run_event_loop

    child_init(parent)
    try:
        run_event_loop(_serve_async(jobs_in, results_out, settings), settings.event_loop)
    except PARENT_GONE:
        os._exit(0)  # nobody to report to, and nothing to say on a terminal
    except BaseException:  # a bug: the parent fails this worker's jobs with the reason
        with contextlib.suppress(*PARENT_GONE, OSError):
            results_out.send(Failed(traceback.format_exc()))
        os._exit(1)


class _Outbox:
    """Results go to the parent in batches: at most BATCH, at most FLUSH_S late."""

    def __init__(self, results_out: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._out = results_out
        self._loop = loop
        self._batch: list[Result] = []

    def tell(self, message: ToParent) -> None:
        try:
            self._out.send(message)
        except PARENT_GONE:  # killed: nobody to report to, nothing to say on a terminal
            os._exit(0)

    def flush(self) -> None:
        if self._batch:
            self.tell(Results(tuple(self._batch)))
            self._batch.clear()

    def emit(self, result: Result) -> None:
        self._batch.append(result)
        if len(self._batch) >= BATCH or result.fault:  # the parent stops the run on a fault
            self.flush()
        elif len(self._batch) == 1:
            self._loop.call_later(FLUSH_S, self.flush)


class _SharedGate(HostGate):
    """A worker's gate: a pause one worker hears (429, Retry-After) is passed, through
    the parent, to every other worker, so all of them leave the host alone."""

    def __init__(self, rate: float, outbox: _Outbox) -> None:
        super().__init__(rate)
        self._outbox = outbox

    def pause(self, host: str, seconds: float) -> None:
        super().pause(host, seconds)
        self._outbox.tell(Pause(host, time.monotonic() + seconds))

    def heard(self, host: str, until: float) -> None:
        """A sibling's pause: held here too, and not passed on again."""
        super().pause(host, until - time.monotonic())


class _Inbox:
    """The parent's messages, read on the loop as they arrive."""

    def __init__(self, jobs_in: Connection, gate: _SharedGate, task: asyncio.Task[None]) -> None:
        self._in = jobs_in
        self._gate = gate
        self._task = task
        self._arrived: asyncio.Queue[Jobs | NoMoreJobs] = asyncio.Queue()

    def receive(self) -> None:
        # Everything waiting, not one message a wake-up: a pipe left full would block
        # the parent's feeder. Reading goes on after the last job: a stop may follow.
        while True:
            try:
                message = self._in.recv()
            except (EOFError, OSError):  # the parent is gone
                message = Stop()
            if isinstance(message, Stop):
                asyncio.get_running_loop().remove_reader(self._in.fileno())
                self._task.cancel()
                return
            if isinstance(message, Pause):
                self._gate.heard(message.host, message.until)
            else:
                self._arrived.put_nowait(message)
            if not self._in.poll():
                return

    async def jobs(self) -> AsyncIterator[Job]:
        while isinstance(message := await self._arrived.get(), Jobs):
            for job in message.jobs:
                yield job


async def _serve_async(jobs_in: Connection, results_out: Connection, settings: Settings) -> None:
    from .aio import run_jobs
    from .pools import cpu_executor

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    outbox = _Outbox(results_out, loop)
    gate = _SharedGate(settings.http.rate, outbox)
    inbox = _Inbox(jobs_in, gate, task)
    loop.add_reader(jobs_in.fileno(), inbox.receive)
    where = placement(settings, "hybrid")
    try:
        # Stopped by the parent: what finished is sent below; the rest never ran.
        with contextlib.suppress(asyncio.CancelledError), cpu_executor(where.cpu) as pool:
            await run_jobs(inbox.jobs(), settings, outbox.emit, pool, write=where.write, gate=gate)
    finally:
        outbox.flush()  # whatever happened, the images already written are reported
    results_out.send(Done())
