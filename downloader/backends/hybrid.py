"""hybrid: the asyncio pipeline on every core, one event loop per worker process.

asyncio alone is one cook: the event loop, aiohttp's parsing and the hand-off of every
body to a thumbnail process all share one core (and one GIL). Here each of ``workers``
processes (default: one per core) runs its own event loop over ``concurrency / workers``
connections and does everything for its jobs in place: fetch, decode and thumbnail on
its own core, atomic write. Nothing but small ``Job`` and ``Result`` records crosses a
process boundary; image bytes never do.

The parent hands out jobs on demand (each worker holds at most ``2 x`` its connections),
so a slow worker gets fewer, and memory stays O(concurrency). It writes the manifest;
workers only return Results. A worker that dies has its unfinished jobs reported as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Iterable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ..errors import DownloaderError
from ..jobs import Job
from ..result import Result
from ..settings import Settings
from ..storage import write_files
from .base import Emit
from .pools import PRELOAD, child_init, cpu_count, mp_context, start_forkserver

_STOP = "stop"  # parent -> worker: Ctrl-C, cancel what is in flight
_DONE = "done"  # worker -> parent: every result sent; the worker exits
_BATCH = 32  # results per message at most; fewer after _FLUSH_S
_FLUSH_S = 0.005
# Workers fork with aiohttp already imported (~0.25 s of CPU each otherwise).
_PRELOAD = (*PRELOAD, "downloader.backends.aio", "aiohttp")


def worker_settings(settings: Settings, workers: int) -> list[Settings]:
    """Each worker's share of the connections, the per-host limit and the rate."""
    http = settings.http
    shares = [
        http.concurrency // workers + (1 if i < http.concurrency % workers else 0)
        for i in range(workers)
    ]
    return [
        settings.replace(
            http=dataclasses.replace(
                http,
                concurrency=share,
                per_host=math.ceil(http.per_host / workers) if http.per_host else 0,
                rate=http.rate / workers,
            )
        )
        for share in shares
    ]


def _serve(jobs_in: Connection, results_out: Connection, settings: Settings, parent: int) -> None:
    """A worker process: run the asyncio pipeline over the jobs the parent sends."""
    from .aio import run_event_loop

    child_init(parent)
    try:
        run_event_loop(_serve_async(jobs_in, results_out, settings), settings.event_loop)
    except BaseException:
        with contextlib.suppress(OSError):
            results_out.send(("error", traceback.format_exc()))
        raise


async def _write_inline(files: list[tuple[Path, bytes]]) -> None:
    # On this worker's own core, a 50 KB write to the page cache costs less than the
    # thread hop aiofiles would take; and a write that is never cancelled halfway needs
    # no roll-back.
    write_files(files)


async def _serve_async(jobs_in: Connection, results_out: Connection, settings: Settings) -> None:
    from .aio import run_jobs

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    batch: list[Result] = []

    def flush() -> None:
        if batch:
            results_out.send(batch.copy())
            batch.clear()

    def emit(result: Result) -> None:
        batch.append(result)
        if len(batch) >= _BATCH:
            flush()
        elif len(batch) == 1:
            loop.call_later(_FLUSH_S, flush)

    arrived: asyncio.Queue[list[Job] | None] = asyncio.Queue()

    def receive() -> None:
        # The parent writes each message whole (a few hundred bytes): readable means
        # recv returns at once.
        try:
            message = jobs_in.recv()
        except (EOFError, OSError):  # the parent is gone
            message = _STOP
        if message == _STOP:
            loop.remove_reader(jobs_in.fileno())
            if task is not None:
                task.cancel()
        elif message is None:
            loop.remove_reader(jobs_in.fileno())
            arrived.put_nowait(None)
        else:
            arrived.put_nowait(message)

    loop.add_reader(jobs_in.fileno(), receive)

    async def jobs() -> AsyncIterator[Job]:
        while (message := await arrived.get()) is not None:
            for job in message:
                yield job

    # Stopped by the parent: what finished is sent below; the rest never ran.
    with contextlib.suppress(asyncio.CancelledError):
        await run_jobs(jobs(), settings, emit, None, write=_write_inline)
    flush()
    results_out.send(_DONE)


@dataclasses.dataclass
class _Worker:
    jobs: Connection
    results: Connection
    process: Any
    credit: int  # jobs it may still be sent: 2 x its connections, less those it holds
    pending: dict[int, Job] = dataclasses.field(default_factory=dict)
    live: bool = True


class _End:
    """The receiver's last word: every worker is done (or dead)."""


class HybridBackend:
    name = "hybrid"

    def prepare(self, settings: Settings) -> None:
        """Called by the pipeline first thing: the forkserver boots while it sets up."""
        start_forkserver(_PRELOAD)

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit) -> None:
        count = min(settings.workers or cpu_count(), settings.http.concurrency)
        workers = _start(settings, count)
        run = _Run(workers)
        threads = [
            threading.Thread(target=run.feed, args=(jobs,), daemon=True, name="job-feeder"),
            threading.Thread(target=run.receive, daemon=True, name="result-receiver"),
        ]
        for thread in threads:
            thread.start()
        try:
            # Only this thread emits, and it only waits on a queue: a Ctrl-C landing here
            # leaves every received result in the queue, to be recorded below.
            run.emit_all(emit)
        except KeyboardInterrupt:
            run.stop()
            with contextlib.suppress(KeyboardInterrupt):
                run.emit_all(_quiet(emit))  # what finished meanwhile is on disk: record it
            raise
        finally:
            run.stop()
            for worker in workers:
                worker.process.join(timeout=5)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                worker.jobs.close()
        if run.feed_error is not None:
            raise run.feed_error


def _start(settings: Settings, count: int) -> list[_Worker]:
    ctx = mp_context(_PRELOAD)
    workers = []
    for share in worker_settings(settings, count):
        jobs_r, jobs_w = ctx.Pipe(duplex=False)
        results_r, results_w = ctx.Pipe(duplex=False)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_serve,
            args=(jobs_r, results_w, share, os.getpid()),
            name="downloader-hybrid",
            daemon=True,
        )
        process.start()
        jobs_r.close()
        results_w.close()
        workers.append(_Worker(jobs_w, results_r, process, 2 * share.http.concurrency))
    return workers


class _Run:
    """The parent's side: a feeder thread hands out jobs as workers have room, a receiver
    thread takes their results, and the calling thread emits them."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers
        self.room = threading.Condition()
        self.stopping = False
        self.inbox: queue.SimpleQueue[Result | BaseException | _End] = queue.SimpleQueue()
        self.feed_error: BaseException | None = None

    def emit_all(self, emit: Emit) -> None:
        while not isinstance(item := self.inbox.get(), _End):
            if isinstance(item, BaseException):
                raise item
            emit(item)

    def stop(self) -> None:
        """Ctrl-C: no more jobs go out, and the workers cancel what they hold."""
        with self.room:
            if self.stopping:
                return
            self.stopping = True
            self.room.notify_all()
            for worker in self.workers:
                if worker.live:
                    _send(worker, _STOP)

    def feed(self, jobs: Iterable[Job]) -> None:
        """Hand each job to the worker with the most room, as room frees up."""
        try:
            for job in jobs:
                with self.room:
                    worker = self._roomiest()
                    if worker is None:
                        return
                    worker.credit -= 1
                    worker.pending[job.index] = job
                    _send(worker, [job])
        except BaseException as exc:  # a broken job stream: the run reports it
            self.feed_error = exc
        finally:
            with self.room:
                if not self.stopping:
                    for worker in self.workers:
                        _send(worker, None)  # no more jobs: finish and say done

    def _roomiest(self) -> _Worker | None:
        while not self.stopping:
            live = [w for w in self.workers if w.live]
            if not live:
                self.inbox.put(DownloaderError("every hybrid worker process died"))
                return None
            best = max(live, key=lambda w: w.credit)
            if best.credit > 0:
                return best
            self.room.wait()
        return None

    def receive(self) -> None:
        by_conn = {w.results: w for w in self.workers}
        try:
            while by_conn:
                for conn in wait(list(by_conn)):
                    worker = by_conn.pop(conn)  # type: ignore[call-overload]
                    if self._take(worker):
                        by_conn[worker.results] = worker
        finally:
            self.inbox.put(_End())

    def _take(self, worker: _Worker) -> bool:
        """Take one message from ``worker``; False once it is done or dead."""
        try:
            message = worker.results.recv()
        except (EOFError, OSError):
            message = None
        if isinstance(message, list):
            with self.room:
                for result in message:
                    worker.pending.pop(result.index, None)
                worker.credit += len(message)
                self.room.notify_all()
            for result in message:
                self.inbox.put(result)
            return True
        with self.room:
            worker.live = False
            lost = list(worker.pending.values())
            worker.pending.clear()
            self.room.notify_all()
        worker.results.close()
        if isinstance(message, tuple):
            self.inbox.put(DownloaderError(f"hybrid worker failed:\n{message[1]}"))
        elif message != _DONE:
            worker.process.join(timeout=5)
            for job in lost:
                self.inbox.put(_lost(job, worker.process.exitcode))
        return False


def _send(worker: _Worker, message: Any) -> None:
    with contextlib.suppress(OSError):
        worker.jobs.send(message)


def _lost(job: Job, code: int | None) -> Result:
    return Result(
        index=job.index,
        url=job.url,
        status="failed",
        attempts=0,
        elapsed_ms=0.0,
        error=f"worker process died (exit code {code}) before finishing this image",
    )


def _quiet(emit: Emit) -> Emit:
    def quiet(result: Result) -> None:
        with contextlib.suppress(KeyboardInterrupt):
            emit(result)

    return quiet
