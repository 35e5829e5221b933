"""Executors shared by the backends: the process-start method and the CPU-stage pool."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from multiprocessing.context import BaseContext
from typing import TypeVar

from ..settings import ThumbnailSettings
from ..stop import StopToken

T = TypeVar("T")
R = TypeVar("R")


PRELOAD = ("downloader.backends._detach", "downloader.work")


def mp_context(preload: tuple[str, ...] = PRELOAD) -> BaseContext:
    """forkserver where there is one: children fork from a clean, single-threaded server
    that has already imported the heavy modules, instead of forking a parent that runs
    threads (progress bar, test servers) or paying a full interpreter start (spawn).
    ``preload`` counts only for the first call: one forkserver serves the process."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


def start_forkserver(preload: tuple[str, ...] = PRELOAD) -> None:
    """Start the forkserver now, so that it imports ``preload`` while this process is
    still busy with its own set-up, rather than when the first worker is asked for."""
    if mp_context(preload).get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def child_init(parent_pid: int) -> None:
    """Set up a child process (pool worker, local server) of the run in ``parent_pid``.

    Ctrl-C is left to the parent, which stops the run in order (a terminal sends SIGINT to
    the whole process group). And the child exits when the parent is gone: pool workers
    hold both ends of their call queue, so a parent killed with -9 would otherwise leave
    them (and the forkserver) waiting forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # pragma: no cover - pid reused by another user
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def reap_forkserver() -> None:
    """Stop and wait for the forkserver, once no pool is left. Pool workers are its
    children, so only then do their CPU time and peak memory reach this process's
    RUSAGE_CHILDREN (compare's numbers would otherwise leave them out)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def cpu_executor(thumbnails: ThumbnailSettings) -> Iterator[Executor | None]:
    """Where the CPU-bound thumbnail stage runs: a process pool, a thread pool, or inline
    (None). Pillow releases the GIL while decoding and resizing, so threads parallelise
    it too; processes also parallelise any pure-Python work around it."""
    if thumbnails.executor == "inline":
        yield None
        return
    pool: Executor
    if thumbnails.executor == "process":
        pool = ProcessPoolExecutor(
            cpu_count(), mp_context=mp_context(), initializer=child_init, initargs=(os.getpid(),)
        )
    else:
        pool = ThreadPoolExecutor(cpu_count(), thread_name_prefix="thumbnail")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lazily cut ``items`` into lists of ``size`` (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def bounded_map(
    executor: Executor, fn: Callable[[T], R], items: Iterable[T], limit: int, stop: StopToken
) -> Iterator[R]:
    """``executor.map`` that pulls ``items`` lazily, keeps at most ``limit`` in flight and
    yields results as they complete (not in order), so memory is O(limit), not O(n).

    Once ``stop`` is set it takes no more items and cancels what has not started; what is
    already running is still yielded (its files may be on disk and need their lines).
    """
    pending: set[Future[R]] = set()  # submitted and not yet yielded
    it = iter(items)
    try:
        while not stop.is_set():
            if len(pending) >= limit:
                yield from _completed(pending)
                continue
            try:
                item = next(it)
            except StopIteration:
                break
            pending.add(executor.submit(fn, item))
        if stop.is_set():
            pending -= {f for f in pending if f.cancel()}
        while pending:
            yield from _completed(pending)
    finally:
        for future in pending:
            future.cancel()


def _completed(pending: set[Future[R]]) -> Iterator[R]:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        pending.discard(future)
        yield future.result()
