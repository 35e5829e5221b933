"""Where the asyncio backend checks, decodes and writes an image (``thumbnails.executor``),
and that a stop or a Ctrl-C while it does leaves no file without its manifest line."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE_S, ImageServer, make_settings

from downloader import StopToken
from downloader.fetch import Fetched
from downloader.jobs import Job
from downloader.lock import LOCK
from downloader.manifest import read_manifest
from downloader.pipeline import run
from downloader.result import Result
from downloader.settings import Settings
from downloader.storage import MANIFEST
from downloader.thumbnails import ImageInfo, inspect_image
from downloader.work import AsyncCpuStage

SLOW_WRITE_S = 0.3  # a slow disk: the cancel reaches the task while its write still runs


def test_asyncio_stopped_while_a_thread_decodes_writes_nothing_for_it(
    image_server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode runs in a thread, the write on the loop after it: a stop that lands
    while a thread decodes cancels the task at its await, and the thread's work is
    dropped: no file and no line for that image, and no file without its line."""
    from downloader import work
    from downloader.backends import aio

    stop = StopToken()
    fetched_urls: list[tuple[bytes, str]] = []  # each body, by identity, and its URL
    decoding: list[int] = []  # the index whose decode the stop lands in
    cancelled = threading.Event()  # that index's task has been cancelled
    waited: list[bool] = []
    real_fetch, real_handle = work.fetch_async, aio.handle_async

    async def recording_fetch(session: Any, url: str, *args: Any, **kwargs: Any) -> Fetched:
        fetched = await real_fetch(session, url, *args, **kwargs)
        fetched_urls.append((fetched.data, url))
        return fetched

    async def watched(
        session: Any, job: Job, settings: Settings, cpu: AsyncCpuStage, *args: Any
    ) -> Result:
        async def watched_cpu(data: bytes) -> ImageInfo:
            try:
                return await cpu(data)
            except asyncio.CancelledError:  # the cancel reached the task at its decode
                if decoding and job.index == decoding[0]:
                    cancelled.set()
                raise

        return await real_handle(session, job, settings, watched_cpu, *args)

    def slow_decode(data: bytes, **kwargs: object) -> ImageInfo:
        if not decoding:
            url = next(url for body, url in fetched_urls if body is data)
            decoding.append(int(url.rsplit("lock=", 1)[1]))
            stop.set("test")  # the stop lands while this thread decodes
            # Holds the decode until its task is cancelled, so its result comes too late.
            waited.append(cancelled.wait(DEADLINE_S))
        return inspect_image(data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(work, "fetch_async", recording_fetch)
    monkeypatch.setattr(aio, "handle_async", watched)
    monkeypatch.setattr(work, "inspect_image", slow_decode)
    out = tmp_path / "pic"
    settings = make_settings("asyncio", out, image_server.base + "/320/240?lock={i}", 40)
    settings = settings.replace(
        name_template="{index}{ext}",  # a file's stem is its index
        thumbnails=dataclasses.replace(settings.thumbnails, executor="thread"),
    )
    report = run(settings, stop=stop)
    assert len(decoding) == 1 and report.interrupted
    manifest = read_manifest(out)
    stems = {p.stem for p in out.rglob("*") if p.is_file()}
    assert decoding[0] not in manifest and str(decoding[0]) not in stems, (decoding, stems)
    assert waited == [True]
    recorded = {r.path for r in manifest.values() if r.ok}
    on_disk = {p.name for p in out.iterdir() if p.is_file() and p.name not in (MANIFEST, LOCK)}
    assert on_disk == recorded and len(recorded) < 40
    thumbs = {p.name for p in (out / "thumbnails").iterdir()}
    assert len(thumbs) == len(recorded)


@pytest.mark.parametrize("executor", ["process", "thread", "inline"])
def test_asyncio_ctrl_c_during_a_write_leaves_no_unrecorded_file(
    image_server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executor: str
) -> None:
    """The first write sends this process SIGINT and goes on once the run's stop is set:
    the stop always lands while a write is under way (on aiofiles' thread with a process
    pool, else on the loop itself, which no cancel can interrupt), and each write stays
    slow so the backend cancels its task before the write ends."""
    import aiofiles.os

    from downloader import work
    from downloader.storage import write_files

    stop = StopToken()
    signalled = threading.Event()

    def slow_write(files: list[tuple[Path, bytes]]) -> None:
        if not signalled.is_set():
            signalled.set()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.wait(DEADLINE_S)
        time.sleep(SLOW_WRITE_S)
        write_files(files)

    if executor == "process":  # the write goes through aiofiles' thread
        monkeypatch.setattr(work, "write_files_async", aiofiles.os.wrap(slow_write))
    else:  # the loop writes (work.write_inline)
        monkeypatch.setattr(work, "write_files", slow_write)
    out = tmp_path / "pic"
    settings = make_settings("asyncio", out, image_server.base + "/320/240?lock={i}", 4)
    settings = settings.replace(
        thumbnails=dataclasses.replace(settings.thumbnails, executor=executor)
    )
    report = run(settings, stop=stop)
    assert signalled.is_set()
    assert report.interrupted
    recorded = {r.path for r in read_manifest(out).values() if r.ok}
    on_disk = {p.name for p in out.iterdir() if p.is_file() and p.name not in (MANIFEST, LOCK)}
    assert on_disk == recorded


@pytest.mark.parametrize(
    ("size", "verify", "where"),
    [(0, "header", {"MainThread"}), (0, "full", {"thumbnail"}), (64, "header", {"thumbnail"})],
)
def test_asyncio_auto_executor_decodes_in_threads_and_writes_on_the_loop(
    image_server: ImageServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    verify: str,
    where: set[str],
) -> None:
    """``thumbnails.executor = "auto"``: a header check and a hash run on the event loop
    (cheaper than a hop to a thread and back), a decode goes to the thumbnail threads; the
    files are written on the loop either way."""
    from downloader import work
    from downloader.storage import write_files

    threads: list[str] = []
    writers: list[str] = []

    def recording(data: bytes, **kwargs: object) -> ImageInfo:
        threads.append(threading.current_thread().name.split("_")[0])
        return inspect_image(data, **kwargs)  # type: ignore[arg-type]

    def recording_write(files: list[tuple[Path, bytes]]) -> None:
        writers.append(threading.current_thread().name.split("_")[0])
        write_files(files)

    monkeypatch.setattr(work, "inspect_image", recording)
    monkeypatch.setattr(work, "write_files", recording_write)
    out = tmp_path / "pic"
    base = make_settings("asyncio", out, image_server.base + "/320/240?lock={i}", 6)
    settings = base.replace(
        verify=verify, thumbnails=dataclasses.replace(base.thumbnails, size=size, executor="auto")
    )
    report = run(settings)
    assert (report.ok, report.failed) == (6, 0)
    assert set(threads) == where and len(threads) == 6
    assert set(writers) == {"MainThread"} and len(writers) == 6
    assert len(read_manifest(out)) == 6
