"""hybrid: the asyncio pipeline on every core, one event loop per worker process.

asyncio alone is one cook: the event loop, aiohttp's parsing and the hand-off of every
body to a thumbnail process all share one core (and one GIL). Here each of ``workers``
processes (default: one per core) runs its own event loop over ``concurrency / workers``
connections and does everything for its jobs in place: fetch, decode and thumbnail on
its own core, atomic write. Nothing but small ``Job`` and ``Result`` records crosses a
process boundary; image bytes never do.

The parent hands out jobs on demand (each worker holds at most ``2 x`` its connections),
so a slow worker gets fewer, and memory stays O(concurrency). It writes the manifest;
workers only return Results. A worker that dies or fails has the jobs it held reported as
failed, with the reason; the others carry on with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ..errors import DownloaderError, FetchError
from ..jobs import Job
from ..politeness import HostGate
from ..result import Result
from ..settings import Settings
from ..stop import StopToken
from ..storage import write_files
from .base import Emit
from .pools import PRELOAD, child_init, cpu_count, mp_context, start_forkserver

_STOP = "stop"  # parent -> worker: the run was stopped, cancel what is in flight
_PAUSE = "pause"  # both ways: ("pause", host, until), a host asked for a pause
_DONE = "done"  # worker -> parent: every result sent; the worker exits
_BATCH = 32  # results per message at most; fewer after _FLUSH_S
_FLUSH_S = 0.005
# Workers fork with aiohttp already imported (~0.25 s of CPU each otherwise).
_PRELOAD = (*PRELOAD, "downloader.backends.aio", "aiohttp")
_PARENT_GONE = (BrokenPipeError, ConnectionResetError, EOFError)


def worker_count(settings: Settings) -> int:
    """``workers`` (0: one per core), at most one per connection, and when there is a
    per-host limit, at most one per allowed connection (a worker needs one at least)."""
    count = min(settings.workers or cpu_count(), settings.http.concurrency)
    return min(count, settings.http.per_host) if settings.http.per_host else count


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def worker_settings(settings: Settings, workers: int) -> list[Settings]:
    """Each worker's share of the connections, the per-host limit and the rate: the
    shares add up to the settings' totals."""
    http = settings.http
    per_host = _split(http.per_host, workers) if http.per_host else [0] * workers
    return [
        settings.replace(
            http=dataclasses.replace(
                http, concurrency=share, per_host=host_share, rate=http.rate / workers
            )
        )
        for share, host_share in zip(_split(http.concurrency, workers), per_host, strict=True)
    ]


# ---------------------------------------------------------------------------- worker side


def _serve(jobs_in: Connection, results_out: Connection, settings: Settings, parent: int) -> None:
    """A worker process: run the asyncio pipeline over the jobs the parent sends."""
    from .aio import run_event_loop

    child_init(parent)
    try:
        run_event_loop(_serve_async(jobs_in, results_out, settings), settings.event_loop)
    except _PARENT_GONE:
        os._exit(0)  # nobody to report to, and nothing to say on a terminal
    except BaseException:  # a bug: the parent fails this worker's jobs with the reason
        with contextlib.suppress(*_PARENT_GONE, OSError):
            results_out.send(("error", traceback.format_exc()))
        os._exit(1)


class _SharedGate(HostGate):
    """A worker's gate: a pause one worker hears (429, Retry-After) is passed, through
    the parent, to every other worker, so all of them leave the host alone."""

    def __init__(self, rate: float, tell: Any) -> None:
        super().__init__(rate)
        self._tell = tell

    def pause(self, host: str, seconds: float) -> None:
        super().pause(host, seconds)
        self._tell((_PAUSE, host, time.monotonic() + seconds))  # CLOCK_MONOTONIC: machine-wide

    def heard(self, host: str, until: float) -> None:
        """A sibling's pause: held here too, and not passed on again."""
        super().pause(host, until - time.monotonic())


async def _write_inline(files: list[tuple[Path, bytes]]) -> None:
    # On this worker's own core, a 50 KB write to the page cache costs less than the
    # thread hop aiofiles would take. It has no await, so a cancel can never land between
    # the write and the Result (a file without its manifest line).
    write_files(files)


async def _serve_async(jobs_in: Connection, results_out: Connection, settings: Settings) -> None:
    from .aio import run_jobs

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    batch: list[Result] = []

    def tell(message: Any) -> None:
        try:
            results_out.send(message)
        except _PARENT_GONE:  # killed: nobody to report to, nothing to say on a terminal
            os._exit(0)

    def flush() -> None:
        if batch:
            tell(batch.copy())
            batch.clear()

    gate = _SharedGate(settings.http.rate, tell)

    def emit(result: Result) -> None:
        batch.append(result)
        if len(batch) >= _BATCH or result.fault:  # the parent stops the run on a fault
            flush()
        elif len(batch) == 1:
            loop.call_later(_FLUSH_S, flush)

    arrived: asyncio.Queue[list[Job] | None] = asyncio.Queue()

    def receive() -> None:
        # Everything waiting, not one message a wake-up: a pipe left full would block
        # the parent's feeder. Reading goes on after the last job: a stop may follow.
        while True:
            try:
                message = jobs_in.recv()
            except (EOFError, OSError):  # the parent is gone
                message = _STOP
            if message == _STOP:
                loop.remove_reader(jobs_in.fileno())
                if task is not None:
                    task.cancel()
                return
            if isinstance(message, tuple):
                gate.heard(message[1], message[2])
            else:
                arrived.put_nowait(message)
            if not jobs_in.poll():
                return

    loop.add_reader(jobs_in.fileno(), receive)

    async def jobs() -> AsyncIterator[Job]:
        while (message := await arrived.get()) is not None:
            for job in message:
                yield job

    try:
        # Stopped by the parent: what finished is sent below; the rest never ran.
        with contextlib.suppress(asyncio.CancelledError):
            await run_jobs(jobs(), settings, emit, None, write=_write_inline, gate=gate)
    finally:
        flush()  # whatever happened, the images already written are reported
    results_out.send(_DONE)


# ---------------------------------------------------------------------------- parent side


@dataclasses.dataclass
class _Worker:
    jobs: Connection
    results: Connection
    process: Any
    credit: int  # jobs it may still be sent: 2 x its connections, less those it holds
    pending: dict[int, Job] = dataclasses.field(default_factory=dict)
    live: bool = True
    sending: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def send(self, message: Any) -> None:
        """Send without holding the run's lock: a full pipe must not stop the receiver."""
        with self.sending, contextlib.suppress(OSError):
            self.jobs.send(message)


class _End:
    """The receiver's last word: every worker is done (or dead)."""


class _Stopping:
    """The run's stop token was set: tell the workers, then go on emitting until _End."""


class HybridBackend:
    name = "hybrid"

    def prepare(self, settings: Settings) -> None:
        """Called by the pipeline early: the forkserver boots while it sets up."""
        start_forkserver(_PRELOAD)

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        workers = _start(settings, worker_count(settings))
        run = _Run(workers)
        try:
            # The receiver first: once a job can have gone out, someone takes its result.
            threading.Thread(target=run.receive, daemon=True, name="hybrid-results").start()
            threading.Thread(target=run.feed, args=(jobs,), daemon=True, name="hybrid-jobs").start()
            threading.Thread(target=run.relay, daemon=True, name="hybrid-pauses").start()
            # A stop (maybe from a signal handler) only wakes the emitting thread, which
            # then tells the workers; it goes on emitting until every worker is done.
            with stop.calling(lambda: run.inbox.put(_Stopping())):
                run.emit_all(emit)  # only this thread emits, and it waits on nothing else
        finally:
            run.stop()
            run.pauses.put(None)
            for worker in workers:
                worker.process.join(timeout=5)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                worker.jobs.close()
        if run.feed_error is not None:
            raise run.feed_error
        if not run.fed_all and not stop.is_set():  # every worker is gone, and jobs are left
            raise DownloaderError(
                f"every hybrid worker process failed; the last: {run.last_failure}"
            )


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
    thread takes their results, and the calling thread emits them. ``room`` guards the
    workers' credit, pending jobs and liveness; no pipe is ever written under it."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers
        self.room = threading.Condition()
        self.stopping = False
        # SimpleQueue: its put may run in a signal handler (see HybridBackend.run).
        self.inbox: queue.SimpleQueue[Result | _End | _Stopping] = queue.SimpleQueue()
        # Host pauses heard by one worker, for the others; sent by a thread of their own,
        # so the receiver never waits on a worker's full pipe.
        self.pauses: queue.SimpleQueue[tuple[_Worker, Any] | None] = queue.SimpleQueue()
        self.feed_error: BaseException | None = None
        self.fed_all = False  # every job was handed out (set before the workers hear so)
        self.last_failure = ""

    def emit_all(self, emit: Emit) -> None:
        while not isinstance(item := self.inbox.get(), _End):
            if isinstance(item, _Stopping):
                self.stop()
            else:
                emit(item)

    def stop(self) -> None:
        """No more jobs go out, and the workers cancel what they hold."""
        with self.room:
            if self.stopping:
                return
            self.stopping = True
            self.room.notify_all()
            live = [w for w in self.workers if w.live]
        for worker in live:
            worker.send(_STOP)

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
                worker.send([job])
            self.fed_all = True
        except BaseException as exc:  # a broken job stream: the run reports it
            self.feed_error = exc
        finally:
            for worker in self.workers:
                worker.send(None)  # no more jobs: finish what you hold and say done

    def relay(self) -> None:
        while (item := self.pauses.get()) is not None:
            source, message = item
            with self.room:
                others = [w for w in self.workers if w.live and w is not source]
            for worker in others:
                worker.send(message)

    def _roomiest(self) -> _Worker | None:
        while not self.stopping:
            live = [w for w in self.workers if w.live]
            if not live:
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
            self.inbox.put(_End())  # after every result and every lost job

    def _take(self, worker: _Worker) -> bool:
        """Take one message from ``worker``; False once it is done, dead or failed."""
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
        if isinstance(message, tuple) and message[0] == _PAUSE:
            self.pauses.put((worker, message))
            return True
        worker.results.close()
        if message == _DONE:
            reason = ""
        elif isinstance(message, tuple):
            reason = f"worker process failed: {_last_line(message[1])}"
        else:
            worker.process.join(timeout=5)
            reason = f"worker process died (exit code {worker.process.exitcode})"
        with self.room:
            worker.live = False
            # After a stop, the jobs a worker still held were cancelled, not failed:
            # they get no line, and --resume runs them again.
            lost = [] if self.stopping else list(worker.pending.values())
            worker.pending.clear()
            if reason:
                self.last_failure = reason
            self.room.notify_all()
        for job in lost:
            self.inbox.put(_lost(job, reason or "worker process ended early"))
        return False


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "unknown error"


def _lost(job: Job, reason: str) -> Result:
    # Imported here: the parent has no other use for the per-job steps (or for Pillow).
    from ..work import failure

    return failure(job, FetchError(f"{reason} before finishing this image"), time.perf_counter(), 0)
