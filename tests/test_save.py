"""``work.save_in``: an image's CPU stage and write in one thread hop, undone when cancelled;
and the asyncio backend, Ctrl-C'd while a write is under way, leaves no unrecorded file."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import DEADLINE_S, ImageServer, jpeg, make_settings

from downloader import StopToken
from downloader.fetch import Fetched
from downloader.jobs import Job
from downloader.lock import LOCK
from downloader.manifest import read_manifest
from downloader.pipeline import run
from downloader.settings import Settings
from downloader.storage import MANIFEST
from downloader.thumbnails import ImageInfo, inspect_image
from downloader.work import save_in

URL = "http://images.test/photo/7.jpg"
SLOW_WRITE_S = 0.3  # a slow disk: the cancel reaches the task while its write still runs


def settings(out: Path) -> Settings:
    (out / "thumbnails").mkdir(parents=True)
    return Settings(out=out)


async def test_save_in_writes_the_image_and_its_thumbnail(tmp_path: Path) -> None:
    data = jpeg(1)
    with ThreadPoolExecutor(1) as pool:
        stage = lambda body: inspect_image(body, 32)  # noqa: E731
        info, saved = await save_in(
            pool, settings(tmp_path), stage, Job(7, URL), Fetched(URL, URL, data, "image/jpeg")
        )
    assert (tmp_path / saved.image).read_bytes() == data
    assert saved.thumbnail is not None and (tmp_path / saved.thumbnail).is_file()
    assert info.width > 0


async def test_cancelled_save_takes_its_files_back_out(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()

    def slow_stage(body: bytes) -> ImageInfo:
        started.set()
        release.wait(10)
        return inspect_image(body, 32)

    fetched = Fetched(URL, URL, jpeg(2), "image/jpeg")
    with ThreadPoolExecutor(1) as pool:
        task = asyncio.ensure_future(
            save_in(pool, settings(tmp_path), slow_stage, Job(7, URL), fetched)
        )
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0)  # the cancel reaches save_in, which waits for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == []  # the thread wrote both files; the cancel removed them


@pytest.mark.parametrize("executor", ["process", "thread", "inline"])
def test_asyncio_ctrl_c_during_a_write_leaves_no_unrecorded_file(
    image_server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executor: str
) -> None:
    """The first write sends this process SIGINT and goes on once the run's stop is set:
    the stop always lands while a write is under way (on another thread, or with
    ``inline`` on the loop itself, which no cancel can interrupt), and each write stays
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
    else:  # the thumbnail thread writes too (work.save_in), or the loop (work.write_inline)
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
def test_asyncio_auto_executor_checks_on_the_loop_only_when_nothing_is_decoded(
    image_server: ImageServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    verify: str,
    where: set[str],
) -> None:
    """``thumbnails.executor = "auto"``: a header check, a hash and the write run on the
    event loop (cheaper than a hop to a thread and back); a decode goes to the thumbnail
    threads, and the write with it."""
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
    assert set(writers) == where and len(writers) == 6
    assert len(read_manifest(out)) == 6
