"""``work.save_in``: an image's CPU stage and write in one thread hop, undone when cancelled."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import jpeg

from downloader.fetch import Fetched
from downloader.jobs import Job
from downloader.settings import Settings
from downloader.thumbnails import ImageInfo, inspect_image
from downloader.work import save_in

URL = "http://images.test/photo/7.jpg"


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
