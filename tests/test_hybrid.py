"""The hybrid backend's own risks: splitting the connections, and a worker process dying."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from conftest import ImageServer, make_settings

from downloader.backends.hybrid import worker_settings
from downloader.pipeline import run
from downloader.result import Result
from downloader.server import make_app, server_thread
from downloader.settings import HttpSettings, ServerSettings, Settings
from downloader.storage import MANIFEST


@pytest.mark.parametrize(
    ("concurrency", "workers", "shares"),
    [(64, 2, [32, 32]), (5, 2, [3, 2]), (3, 3, [1, 1, 1])],
)
def test_connections_and_rate_are_split_between_workers(
    concurrency: int, workers: int, shares: list[int]
) -> None:
    settings = Settings(http=HttpSettings(concurrency=concurrency, per_host=5, rate=10.0))
    split = worker_settings(settings, workers)
    assert [s.http.concurrency for s in split] == shares
    assert all(s.http.rate == 10.0 / workers for s in split)
    assert all(s.http.per_host == -(-5 // workers) for s in split)


class KillOneWorker:
    """An Observer that SIGKILLs one hybrid worker when the ``at``-th result arrives."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.victim: int | None = None

    def start(self, to_run: int | None, kept: int) -> None:
        pass

    def result(self, result: Result) -> None:
        self.seen += 1
        if self.seen == self.at:
            children = multiprocessing.active_children()
            workers = [p for p in children if p.name == "downloader-hybrid"]
            assert len(workers) == 2, workers
            self.victim = workers[0].pid
            assert self.victim is not None
            os.kill(self.victim, signal.SIGKILL)


def test_a_dead_worker_fails_only_its_own_images(tmp_path: Path) -> None:
    """Every job still gets exactly one result: the ones the dead worker held are failed
    with the reason, and the surviving worker runs all the rest."""
    count = 60
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=3, latency_ms=40))) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        observer = KillOneWorker(at=6)
        report = run(make_settings("hybrid", out, url, count), observer)

    assert observer.victim is not None
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(count))
    lost = [line for line in lines if line["status"] == "failed"]
    # The victim held at most 2 x its 2 connections; it may have finished some of them.
    assert 1 <= len(lost) <= 4, lost
    assert all("worker process died" in line["error"] for line in lost)
    assert report.ok == count - len(lost)
    for line in lines:
        if line["status"] == "ok":
            assert (out / line["path"]).is_file()


def test_results_match_the_asyncio_backend(image_server: ImageServer, tmp_path: Path) -> None:
    """Same URLs, same bytes and names: hybrid is asyncio spread over processes."""
    url = image_server.base + "/{width}/{height}?lock={i}"
    manifests = {}
    for backend in ("asyncio", "hybrid"):
        out = tmp_path / backend
        report = run(make_settings(backend, out, url, 12))
        assert report.ok == 12
        manifests[backend] = {
            json.loads(line)["index"]: (json.loads(line)["path"], json.loads(line)["sha256"])
            for line in (out / MANIFEST).read_text().splitlines()
        }
    assert manifests["asyncio"] == manifests["hybrid"]
