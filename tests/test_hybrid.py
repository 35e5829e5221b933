"""The hybrid backend's own risks: splitting the connections, and a worker process dying."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import (
    ImageServer,
    alive,
    cli_args,
    grandchildren,
    launched,
    make_settings,
    records,
    server_stats,
    under_way,
    wait_for,
)

from downloader.backends.hybrid import End, ParentRun, Stopping, worker_count, worker_settings
from downloader.children import cpu_count
from downloader.errors import DownloaderError
from downloader.pipeline import run
from downloader.result import Result
from downloader.server import make_app, server_thread
from downloader.settings import HttpSettings, ServerSettings, Settings


@pytest.mark.parametrize(
    ("concurrency", "workers", "shares", "per_host"),
    [(64, 2, [32, 32], [3, 2]), (5, 2, [3, 2], [3, 2]), (5, 5, [1] * 5, [1] * 5)],
)
def test_connections_limits_and_rate_add_up_over_the_workers(
    concurrency: int, workers: int, shares: list[int], per_host: list[int]
) -> None:
    settings = Settings(http=HttpSettings(concurrency=concurrency, per_host=5, rate=10.0))
    split = worker_settings(settings, workers)
    assert [s.http.concurrency for s in split] == shares
    assert [s.http.per_host for s in split] == per_host
    assert all(s.http.rate == 10.0 / workers for s in split)


@pytest.mark.parametrize(
    ("workers", "concurrency", "per_host", "expected"),
    [(0, 64, 0, cpu_count()), (4, 2, 0, 2), (4, 64, 1, 1), (3, 64, 2, 2), (3, 64, 0, 3)],
)
def test_worker_count(workers: int, concurrency: int, per_host: int, expected: int) -> None:
    http = HttpSettings(concurrency=concurrency, per_host=per_host)
    assert worker_count(Settings(workers=workers, http=http)) == expected


class KillOneWorker:
    """An Observer that SIGKILLs one hybrid worker when the ``at``-th result arrives."""

    def __init__(self, at: int, every: bool = False) -> None:
        self.at = at
        self.every = every
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
            for worker in workers if self.every else workers[:1]:
                assert worker.pid is not None
                self.victim = worker.pid
                os.kill(worker.pid, signal.SIGKILL)


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
    lines = records(out)
    assert sorted(line["index"] for line in lines) == list(range(count))
    lost = [line for line in lines if line["status"] == "failed"]
    # The victim held at most 2 x its 2 connections; it may have finished some of them.
    assert 1 <= len(lost) <= 4, lost
    assert all("worker process died" in line["error"] for line in lost)
    assert report.ok == count - len(lost)
    for line in lines:
        if line["status"] == "ok":
            assert (out / line["path"]).is_file()


def test_when_every_worker_dies_the_run_fails_after_recording_what_it_can(
    tmp_path: Path,
) -> None:
    count = 60
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=3, latency_ms=40))) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        with pytest.raises(DownloaderError, match="every hybrid worker process failed"):
            run(make_settings("hybrid", out, url, count), KillOneWorker(at=6, every=True))

    lines = records(out)
    indices = [line["index"] for line in lines]
    assert len(indices) == len(set(indices)) < count  # no image twice; the rest not tried
    lost = [line for line in lines if line["status"] == "failed"]
    assert lost and all("worker process died" in line["error"] for line in lost)
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
        manifests[backend] = {r["index"]: (r["path"], r["sha256"]) for r in records(out)}
    assert manifests["asyncio"] == manifests["hybrid"]


def test_ctrl_c_stops_downloads_in_flight_after_the_last_job_went_out(tmp_path: Path) -> None:
    """With -n <= 2 x concurrency every job is handed out at once, and the workers are
    told "no more jobs" at once: a Ctrl-C must still cancel what they hold, not wait for
    the server's 60 s."""
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=2, latency_ms=60_000))) as server:
        args = cli_args("hybrid", server.base_url, out, 4)
        with launched(args, tmp_path) as proc:
            wait_for(
                lambda: sum(server_stats(server).values()) >= 4, "4 requests in flight", proc=proc
            )
            os.kill(proc.pid, signal.SIGINT)
            try:
                stdout, stderr = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail("Ctrl-C waited for the downloads in flight")
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    assert stdout.startswith("interrupted:")


def test_long_urls_fill_the_pipes_without_a_deadlock(tmp_path: Path) -> None:
    """~1.5 KB URLs: a worker's jobs (2 x 32 of them) and a batch of 32 results each
    outgrow a 64 KiB pipe, so both sides block on writes at times."""
    out = tmp_path / "pic"
    count = 300
    with server_thread(make_app(ServerSettings(seed=4))) as server:
        args = cli_args("hybrid", server.base_url, out, count, 64, query="&pad=" + "x" * 1500)
        with launched(args, tmp_path) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("the run hung")
    assert proc.returncode == 0, (stdout, stderr)
    lines = records(out)
    assert sorted(line["index"] for line in lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines)


def test_workers_exit_quietly_when_the_parent_is_killed(tmp_path: Path) -> None:
    with under_way("hybrid", tmp_path, 400, lines=10, seed=5, concurrency=8) as live:
        proc, tree = live.proc, live.tree
        # The workers are the forkserver's children; without them the check below holds
        # for an empty tree.
        workers = grandchildren(proc.pid)
        assert len(workers) == min(cpu_count(), 8) and workers <= tree, (workers, tree)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in tree), "the workers to exit")
        assert proc.stderr is not None
        stderr = proc.stderr.read()  # every writer is gone: this reaches EOF
    assert "Traceback" not in stderr, stderr


def test_a_stop_still_emits_every_result_the_workers_send() -> None:
    """The stop token only wakes the emitting thread: it tells the workers to stop and
    goes on emitting what they still send (their files are on disk) until the end."""
    run = ParentRun([])
    run.inbox.put(Result(index=0, url="http://h/0", status="ok"))
    run.inbox.put(Stopping())
    for index in (1, 2):
        run.inbox.put(Result(index=index, url=f"http://h/{index}", status="ok"))
    run.inbox.put(End())
    seen: list[tuple[int, bool]] = []
    run.emit_all(lambda result: seen.append((result.index, run.stopping)))
    assert seen == [(0, False), (1, True), (2, True)]
