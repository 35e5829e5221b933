"""The per-job steps every backend schedules: fetch -> decode/thumbnail -> write -> Result.

Backends differ only in *where* these run (a loop, threads, tasks, processes, Dask
workers); the steps themselves exist once, here. A per-URL failure is returned as a failed
``Result``, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import busywork
from .errors import FetchError
from .fetch import Fetched, fetch_async, fetch_sync
from .jobs import Job, check_url
from .placement import WritePlace
from .politeness import HostGate
from .result import Result, Sample
from .samples import SampleSpec
from .settings import Settings
from .shards import key_of, shard_name
from .storage import (
    safe_name,
    sha256,
    storage_fault,
    thumbnail_name,
    write_files,
    write_files_async,
)
from .thumbnails import ImageInfo, inspect_image
from .timeline import Laps, ran_stage

if TYPE_CHECKING:
    import aiohttp
    import requests

    from .stop import StopToken

CpuStage = Callable[[bytes], ImageInfo]
AsyncCpuStage = Callable[[bytes], Awaitable[ImageInfo]]
AsyncWrite = Callable[[list[tuple[Path, bytes]]], Awaitable[None]]


def cpu_stage(settings: Settings) -> CpuStage:
    """``inspect_image`` bound to the thumbnail settings, followed by the pure-Python
    stand-in for user code when ``thumbnails.python_cpu_ms`` asks for it: a ``partial``, so
    a process pool can pickle it as well as a thread can call it."""
    stage = functools.partial(
        inspect_image,
        size=settings.thumbnails.size,
        quality=settings.thumbnails.quality,
        verify=settings.verify,
        sample=sample_spec(settings),
    )
    if settings.thumbnails.python_cpu_ms:
        stage = functools.partial(busywork.after, stage, settings.thumbnails.python_cpu_ms)
    return functools.partial(ran_stage, stage) if settings.timeline else stage


def sample_spec(settings: Settings) -> SampleSpec | None:
    """What the CPU stage makes of each image beyond checking it: None when the
    downloaded bytes are kept as they are (the files output, no resize, no filter)."""
    spec = SampleSpec.of(settings.dataset)
    if settings.dataset.shards or spec.resize_mode != "no" or spec.filters():
        return spec
    return None


def handle_sync(
    session: requests.Session,
    job: Job,
    settings: Settings,
    cpu: CpuStage,
    gate: HostGate | None = None,
    stop: StopToken | None = None,
) -> Result:
    """Run one job to completion with requests; ``cpu`` is the CPU stage, inline or a call
    that waits on a pool (``pools.sync_cpu_stage``).
    Once ``stop`` is set, its request is cut short and no retry waits."""
    from .deadline import cut_short_by  # requests' world: the asyncio backends never load it

    start = time.perf_counter()
    laps = Laps(job.index) if settings.timeline else None
    fetched: Fetched | None = None
    try:
        _reject_bad_url(job)
        with cut_short_by(stop):
            fetched = fetch_sync(
                session, job.url, settings.http, sleep=_sleep_until(stop), gate=gate
            )
        if laps is not None:
            laps.next()
        info = cpu(fetched.data)
        if laps is not None:
            laps.next(info.ran)
        saved = _plan(settings, job, fetched, info)
        write_files(saved.files)
    except FetchError as exc:
        return with_spans(failure(job, exc, start, resized=fetched is not None), laps)
    except OSError as exc:
        return with_spans(not_written(job, exc, start, fetched, settings), laps)
    return with_spans(success(job, fetched, info, saved, start), laps)


async def handle_async(
    session: aiohttp.ClientSession,
    job: Job,
    settings: Settings,
    cpu: AsyncCpuStage,
    gate: HostGate | None,
    write: AsyncWrite,
    slot: int | None = None,
) -> Result:
    """Run one job to completion with aiohttp; ``cpu`` runs the thumbnail stage (off the
    loop, or on it), ``write`` the files (``async_write``). ``slot``: the worker task's
    number, for the timeline."""
    start = time.perf_counter()
    laps = Laps(job.index, slot) if settings.timeline else None
    fetched: Fetched | None = None
    try:
        _reject_bad_url(job)
        fetched = await fetch_async(session, job.url, settings.http, gate=gate)
        if laps is not None:
            laps.next()
        info = await cpu(fetched.data)
        if laps is not None:
            laps.next(info.ran)
        saved = _plan(settings, job, fetched, info)
        await write(saved.files)
    except FetchError as exc:
        return with_spans(failure(job, exc, start, resized=fetched is not None), laps)
    except OSError as exc:
        return with_spans(not_written(job, exc, start, fetched, settings), laps)
    return with_spans(success(job, fetched, info, saved, start), laps)


def with_spans(result: Result, laps: Laps | None) -> Result:
    """``result`` carrying its timeline spans, when they were recorded."""
    return result if laps is None else dataclasses.replace(result, spans=laps.finish())


def _sleep_until(stop: StopToken | None) -> Callable[[float], None]:
    if stop is None:
        return time.sleep

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


def not_written(
    job: Job, exc: OSError, start: float, fetched: Fetched | None, settings: Settings
) -> Result:
    """A failed Result for an image that could not be written; marked as a storage
    fault when the cause will hit every later image as well (disk full, OUT gone...)."""
    result = failure(job, exc, start, attempts=fetched.attempts if fetched else 1)
    fault = storage_fault(exc, settings.out)
    return dataclasses.replace(result, fault=fault) if fault else result


def async_write(place: WritePlace) -> AsyncWrite:
    """The write ``Placement.write`` names, for ``handle_async``: on the loop
    (``write_inline``), or through aiofiles' threads, rolled back if the task is cancelled."""
    return write_inline if place == "inline" else _write_or_roll_back


async def _write_or_roll_back(files: list[tuple[Path, bytes]]) -> None:
    """Write through aiofiles; if the task is cancelled meanwhile (Ctrl-C), the thread
    still finishes the write, so take the files back out: a cancelled job gets no manifest
    line, and a file without its line is what --resume cannot trust."""
    write = asyncio.ensure_future(write_files_async(files))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await write
        for path, _ in files:
            path.unlink(missing_ok=True)
        raise


async def write_inline(files: list[tuple[Path, bytes]]) -> None:
    """``write_files`` on the event loop itself. A 50 KB write to the page cache costs less
    than a hop to a thread, and far less than the GIL contention of a thread that writes
    while the loop runs (figures in benchmarks/README.md). With no await in it, a cancel
    can never land between the write and the Result (a file without its manifest line)."""
    write_files(files)


def _reject_bad_url(job: Job) -> None:
    problem = check_url(job.url)
    if problem:
        raise FetchError(problem)


@dataclass(frozen=True)
class Saved:
    """Where one image goes: names relative to OUT (a shard format: the shard and the
    sample's key), its digest, the files to write (the thumbnail first, so an image on
    disk always has its thumbnail beside it), and a shard's sample."""

    image: str
    thumbnail: str | None
    sha256: str
    files: list[tuple[Path, bytes]]
    key: str | None = None
    sample: Sample | None = None
    saved_sha256: str | None = None


def _plan(settings: Settings, job: Job, fetched: Fetched, info: ImageInfo) -> Saved:
    digest = info.sha256
    data = fetched.data if info.sample is None else info.sample
    if settings.dataset.shards:
        return _plan_sample(settings, job, info, data)
    image = safe_name(
        job.index,
        fetched.final_url,
        info.ext,
        sha=digest,
        template=settings.name_template,
        size=(info.width, info.height),
    )
    files = [(settings.out / image, data)]
    saved_sha = None if info.sample is None else sha256(info.sample)
    if info.thumbnail is None:
        return Saved(image, None, digest, files, saved_sha256=saved_sha)
    thumb = thumbnail_name(image)
    return Saved(
        image, thumb, digest, [(settings.out / thumb, info.thumbnail), *files],
        saved_sha256=saved_sha,
    )  # fmt: skip


def _plan_sample(settings: Settings, job: Job, info: ImageInfo, data: bytes) -> Saved:
    """A shard format: the sample goes to its shard (by the recorder, or a dask worker);
    only a thumbnail, when asked for, is a file."""
    dataset = settings.dataset
    key = key_of(job.index)
    shard = shard_name(job.index // dataset.samples_per_shard, dataset.output_format)
    sample = Sample(data, info.ext)
    if info.thumbnail is None:
        return Saved(shard, None, info.sha256, [], key, sample)
    thumb = thumbnail_name(f"{key}.jpg")
    return Saved(shard, thumb, info.sha256, [(settings.out / thumb, info.thumbnail)], key, sample)


def success(job: Job, fetched: Fetched, info: ImageInfo, saved: Saved, start: float) -> Result:
    sized = info.sample is not None or saved.key is not None  # a resize, or a dataset row
    return Result(
        index=job.index,
        url=job.url,
        status="ok",
        final_url=fetched.final_url,
        path=saved.image,
        thumbnail=saved.thumbnail,
        bytes=len(fetched.data),
        sha256=saved.sha256,
        width=info.width,
        height=info.height,
        attempts=fetched.attempts,
        elapsed_ms=round((time.perf_counter() - start) * 1000, 2),
        key=saved.key,
        caption=job.caption,
        columns=job.columns,
        original_width=info.original_width if sized else None,
        original_height=info.original_height if sized else None,
        saved_sha256=saved.saved_sha256,
        sample=saved.sample,
    )


def failure(
    job: Job, exc: Exception, start: float, attempts: int | None = None, resized: bool = False
) -> Result:
    """A failed Result; ``resized``: the image was downloaded, and its check, filter or
    resize refused it (img2dataset's ``failed_to_resize``)."""
    tries = attempts if attempts is not None else getattr(exc, "attempts", 0)
    reason = str(exc) if not isinstance(exc, OSError) else f"cannot write file: {exc}"
    if tries > 1:
        reason = f"{reason} (after {tries} attempts)"
    return Result(
        index=job.index,
        url=job.url,
        status="failed",
        attempts=tries,
        elapsed_ms=round((time.perf_counter() - start) * 1000, 2),
        error=reason,
        caption=job.caption,
        columns=job.columns,
        stage="resize" if resized else None,
    )
