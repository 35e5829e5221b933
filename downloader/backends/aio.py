"""asyncio: one aiohttp ClientSession with a sized connector, a fixed pool of worker tasks
pulling from a bounded queue (memory O(concurrency), not O(n)). Where an image's CPU stage
and its write run (on the loop, in a thread pool, in a process pool) is ``placement``'s
call; this module carries it out: ``run_in_executor`` for the CPU stage, aiofiles for a
write off the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..fetch import new_client
from ..jobs import Job, may_block
from ..placement import Placement, WritePlace, placement
from ..politeness import HostGate
from ..settings import Settings
from ..stop import StopToken
from ..thumbnails import ImageInfo
from ..work import async_write, cpu_stage, handle_async
from .base import Emit
from .pools import cpu_executor

_DONE = None


class AsyncioBackend:
    name = "asyncio"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        where = placement(settings, "asyncio")
        run_event_loop(run_pipeline(jobs, settings, emit, stop, where), settings.event_loop)


def run_event_loop(coro: Coroutine[Any, Any, None], event_loop: str = "auto") -> None:
    """``asyncio.run``; on uvloop when it is installed and ``event_loop`` allows it."""
    if event_loop != "asyncio":
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


async def _feed_from_thread(jobs: Iterable[Job], queue: asyncio.Queue[Job | None]) -> None:
    """Read a job stream that may block (a pipe on stdin) on a daemon thread: read on the
    loop, a slow producer would stall every download in flight, and their deadlines with
    them. A daemon thread, because a read blocked on a pipe must not hold up the exit."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def pump() -> None:
        error: BaseException | None = None
        try:
            for job in jobs:
                asyncio.run_coroutine_threadsafe(queue.put(job), loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop is gone or the run was cancelled: nobody is listening
        except BaseException as exc:  # a broken stream: the run reports it, not this thread
            error = exc

        def finish() -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(finish)

    threading.Thread(target=pump, daemon=True, name="job-reader").start()
    await done


async def run_pipeline(
    jobs: Iterable[Job],
    settings: Settings,
    emit: Emit,
    stop: StopToken,
    where: Placement,
) -> None:
    """The whole asyncio pipeline in the running loop, with the CPU-stage pool ``where``
    asks for. Setting ``stop`` cancels it: every worker unwinds through its ``finally``,
    writes cut short are rolled back, and this returns once what finished has been
    emitted."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel() -> None:  # may run in a signal handler: only wakes the loop
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(task.cancel)

    # aiofiles runs writes in the loop's default executor: two threads keep up with the
    # disk, where the default (cores + 4) only adds threads competing for the GIL.
    loop.set_default_executor(ThreadPoolExecutor(2, thread_name_prefix="writer"))
    try:
        with stop.calling(cancel), cpu_executor(where.cpu) as pool:
            await run_jobs(jobs, settings, emit, pool, write=where.write)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        task.uncancel()


async def run_jobs(
    jobs: Iterable[Job] | AsyncIterable[Job],
    settings: Settings,
    emit: Emit,
    pool: concurrent.futures.Executor | None,
    *,
    write: WritePlace,
    gate: HostGate | None = None,
) -> None:
    """The asyncio pipeline: ``http.concurrency`` worker tasks on one ClientSession pull
    jobs from a bounded queue. An image's CPU stage runs in ``pool`` (None: on the loop
    itself); its files are written where ``write`` says (``Placement.write``). ``gate``:
    the politeness gate (default: one for this run, at ``http.rate``)."""
    concurrency = settings.http.concurrency
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=2 * concurrency)
    stage = cpu_stage(settings)

    async def cpu(data: bytes) -> ImageInfo:
        if pool is None:
            return stage(data)
        return await loop.run_in_executor(pool, stage, data)

    write_files = async_write(write)

    gate = gate or HostGate(settings.http.rate)
    async with new_client(settings.http) as session:

        async def worker(slot: int) -> None:
            while (job := await queue.get()) is not _DONE:
                emit(await handle_async(session, job, settings, cpu, gate, write_files, slot))

        async def feed() -> None:
            if isinstance(jobs, AsyncIterable):
                async for job in jobs:
                    await queue.put(job)
            elif may_block(jobs):
                await _feed_from_thread(jobs, queue)
            else:
                for job in jobs:
                    await queue.put(job)
            for _ in range(concurrency):
                await queue.put(_DONE)

        async with asyncio.TaskGroup() as group:
            group.create_task(feed())
            for slot in range(concurrency):
                group.create_task(worker(slot))
