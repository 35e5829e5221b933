"""Executors shared by the backends: the CPU-stage pool and a bounded, stoppable map."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from typing import TypeVar

from ..children import child_init, cpu_count, mp_context
from ..placement import CpuPlace, Placement
from ..settings import Settings
from ..stop import StopToken
from ..thumbnails import ImageInfo
from ..work import CpuStage, cpu_stage

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def cpu_executor(kind: CpuPlace) -> Iterator[Executor | None]:
    """The pool for the CPU stage that ``Placement.cpu`` names: a process pool, a thread
    pool, or none (inline). Pillow releases the GIL while decoding and resizing, so
    threads parallelise it too; processes also parallelise any pure-Python work around it."""
    if kind == "inline":
        yield None
        return
    pool: Executor
    if kind == "process":
        pool = ProcessPoolExecutor(
            cpu_count(), mp_context=mp_context(), initializer=child_init, initargs=(os.getpid(),)
        )
    else:
        pool = ThreadPoolExecutor(cpu_count(), thread_name_prefix="thumbnail")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def sync_cpu_stage(settings: Settings, where: Placement) -> Iterator[CpuStage]:
    """For a backend whose jobs run in threads or processes of their own (``handle_sync``):
    the CPU stage in the pool ``where.cpu`` names, as a call that waits on it, or inline
    (built once, not for every image). Such a backend writes in the job's own thread or
    process."""
    if where.write != "inline":
        raise ValueError(f"handle_sync writes inline, not in a {where.write}")
    stage = cpu_stage(settings)
    with cpu_executor(where.cpu) as pool:
        yield stage if pool is None else functools.partial(_in_pool, pool, stage)


def _in_pool(pool: Executor, stage: CpuStage, data: bytes) -> ImageInfo:
    """Run the CPU stage in ``pool`` and wait for it (the calling thread has nothing else
    to do meanwhile)."""
    return pool.submit(stage, data).result()


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
