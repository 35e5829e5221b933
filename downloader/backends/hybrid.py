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
failed, with the reason; the others carry on with the rest. Parent and workers talk in the
typed records of ``hybrid_messages``.

Why a pool of its own rather than the shard model of ``dask`` (the asyncio pipeline run
once per shard of jobs on a process pool): a shard sets up an event loop, a client session
and its connections each time, and its slowest image holds back the next shard, while
here each worker keeps its loop and connections for the whole run and takes a new job the
moment one finishes. Measured with ``download compare``, the shard model costs more CPU
per image and is slower (numbers in ``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from typing import Any

from ..children import PRELOAD, cpu_count, mp_context, start_forkserver
from ..errors import DownloaderError, FetchError
from ..jobs import Job
from ..result import Result
from ..settings import Settings
from ..stop import StopToken
from .base import Emit
from .hybrid_messages import (
    Done,
    Failed,
    Jobs,
    NoMoreJobs,
    Pause,
    Results,
    Stop,
    ToParent,
    ToWorker,
)
from .hybrid_worker import serve

# Workers fork with aiohttp already imported, instead of each paying for the import
# (its CPU: benchmarks/README.md).
_PRELOAD = (*PRELOAD, "downloader.backends.aio", "aiohttp")


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

    def send(self, message: ToWorker) -> None:
        """Send without holding the run's lock: a full pipe must not stop the receiver."""
        with self.sending, contextlib.suppress(OSError):
            self.jobs.send(message)


class End:
    """The receiver's last word: every worker is done (or dead)."""


class Stopping:
    """The run's stop token was set: tell the workers, then go on emitting until End."""


class HybridBackend:
    name = "hybrid"

    def prepare(self, settings: Settings) -> None:
        """Called by the pipeline early: the forkserver boots while it sets up."""
        start_forkserver(_PRELOAD)

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        workers = _start(settings, worker_count(settings))
        run = ParentRun(workers)
        try:
            # The receiver first: once a job can have gone out, someone takes its result.
            threading.Thread(target=run.receive, daemon=True, name="hybrid-results").start()
            threading.Thread(target=run.feed, args=(jobs,), daemon=True, name="hybrid-jobs").start()
            threading.Thread(target=run.relay, daemon=True, name="hybrid-pauses").start()
            # A stop (maybe from a signal handler) only wakes the emitting thread, which
            # then tells the workers; it goes on emitting until every worker is done.
            with stop.calling(lambda: run.inbox.put(Stopping())):
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
            target=serve,
            args=(jobs_r, results_w, share, os.getpid()),
            name="downloader-hybrid",
            daemon=True,
        )
        process.start()
        jobs_r.close()
        results_w.close()
        workers.append(_Worker(jobs_w, results_r, process, 2 * share.http.concurrency))
    return workers


class ParentRun:
    """The parent's side: a feeder thread hands out jobs as workers have room, a receiver
    thread takes their results, and the calling thread emits them. ``room`` guards the
    workers' credit, pending jobs and liveness; no pipe is ever written under it."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers
        self.room = threading.Condition()
        self.stopping = False
        # SimpleQueue: its put may run in a signal handler (see HybridBackend.run).
        self.inbox: queue.SimpleQueue[Result | End | Stopping] = queue.SimpleQueue()
        # Host pauses heard by one worker, for the others; sent by a thread of their own,
        # so the receiver never waits on a worker's full pipe.
        self.pauses: queue.SimpleQueue[tuple[_Worker, Pause] | None] = queue.SimpleQueue()
        self.feed_error: BaseException | None = None
        self.fed_all = False  # every job was handed out (set before the workers hear so)
        self.last_failure = ""

    def emit_all(self, emit: Emit) -> None:
        while not isinstance(item := self.inbox.get(), End):
            if isinstance(item, Stopping):
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
            worker.send(Stop())

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
                worker.send(Jobs((job,)))
            self.fed_all = True
        except BaseException as exc:  # a broken job stream: the run reports it
            self.feed_error = exc
        finally:
            for worker in self.workers:
                worker.send(NoMoreJobs())

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
            self.inbox.put(End())  # after every result and every lost job

    def _take(self, worker: _Worker) -> bool:
        """Take one message from ``worker``; False once it is done, dead or failed."""
        try:
            message: ToParent | None = worker.results.recv()
        except (EOFError, OSError):
            message = None
        if isinstance(message, Results):
            self._finished(worker, message.results)
            return True
        if isinstance(message, Pause):
            self.pauses.put((worker, message))
            return True
        worker.results.close()
        if isinstance(message, Done):
            reason = ""
        elif isinstance(message, Failed):
            reason = f"worker process failed: {_last_line(message.reason)}"
        else:
            worker.process.join(timeout=5)
            reason = f"worker process died (exit code {worker.process.exitcode})"
        self._ended(worker, reason)
        return False

    def _finished(self, worker: _Worker, results: tuple[Result, ...]) -> None:
        with self.room:
            for result in results:
                worker.pending.pop(result.index, None)
            worker.credit += len(results)
            self.room.notify_all()
        for result in results:
            self.inbox.put(result)

    def _ended(self, worker: _Worker, reason: str) -> None:
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


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "unknown error"


def _lost(job: Job, reason: str) -> Result:
    # Imported here: the parent has no other use for the per-job steps (or for Pillow).
    from ..work import failure

    return failure(job, FetchError(f"{reason} before finishing this image"), time.perf_counter(), 0)
