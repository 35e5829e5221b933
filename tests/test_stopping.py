"""Stopping a run: Ctrl-C and SIGTERM on every CLI backend, an interrupt while a result is
being recorded, and the StopToken (set from another thread, cutting slow requests short,
ending a wait on a silent stdin). Nothing is left half-written, and every file on disk has
its manifest line.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BACKENDS,
    CONTRACT_BACKENDS,
    DEADLINE_S,
    ImageServer,
    alive,
    assert_files_whole,
    assert_ok_files_match,
    by_index,
    cli_args,
    complete_lines,
    grandchildren,
    launched,
    make_settings,
    records,
    server_stats,
    settled_lines,
    under_way,
    visible_files,
    wait_for,
)

from downloader.pipeline import run
from downloader.server import make_app, server_thread
from downloader.settings import ServerSettings, Settings
from downloader.stop import StopToken
from downloader.storage import MANIFEST


@pytest.mark.parametrize(
    ("backend", "signum"),
    [
        ("sync", signal.SIGINT),
        ("asyncio", signal.SIGINT),
        ("threads", signal.SIGINT),
        ("processes", signal.SIGINT),
        ("hybrid", signal.SIGINT),
        ("sync", signal.SIGTERM),
        ("asyncio", signal.SIGTERM),
        ("threads", signal.SIGTERM),
        ("processes", signal.SIGTERM),
        ("hybrid", signal.SIGTERM),
    ],
)
def test_signal_stops_the_run_cleanly(backend: str, signum: int, tmp_path: Path) -> None:
    count = 200
    with under_way(backend, tmp_path, count, lines=10, seed=6) as live:
        out, proc, tree = live.out, live.proc, live.tree
        # To the main process only: a terminal's Ctrl-C signals the whole group, which
        # can kill a pool worker (processes, or the thumbnail pool) that is still
        # starting, see test_ctrl_c_while_pool_workers_start.
        os.kill(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    summary = [line for line in stdout.splitlines() if line.startswith("interrupted:")]
    assert len(summary) == 1, stdout
    lines = settled_lines(out)  # no torn line after a clean stop
    assert 10 <= len(lines) < count, "the signal should land mid-run"
    assert set(lines) <= set(range(count))
    assert_files_whole(out, lines)
    # The summary counts exactly the results the manifest recorded.
    ok = sum(line["status"] == "ok" for line in lines.values())
    failed = len(lines) - ok
    assert f"{backend}: {ok} ok, {failed} failed" in summary[0]
    wait_for(lambda: not any(alive(pid) for pid in tree), "the run's children to exit")


SLOW_BOOT = """\
# `download`, except that each pool worker takes a second to start: it re-runs this file
# as __mp_main__ before the pool's initializer (child_init) gets to ignore SIGINT.
import time

if __name__ == "__mp_main__":
    time.sleep(1.0)

from downloader.cli import main

if __name__ == "__main__":
    main()
"""


def test_ctrl_c_while_pool_workers_start(tmp_path: Path) -> None:
    """The processes backend, Ctrl-C'd while its workers are still starting up. The slow
    start only widens a window every run has (a worker takes a moment to start)."""
    script = tmp_path / "slow_boot_download.py"
    script.write_text(SLOW_BOOT)
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=6, latency_ms=30))) as server:
        args = cli_args("processes", server.base_url, out, 200)
        with launched(args, tmp_path, command=[sys.executable, str(script)]) as proc:
            wait_for(lambda: len(grandchildren(proc.pid)) >= 4, "4 pool workers", proc=proc)
            os.killpg(proc.pid, signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    assert stdout.startswith("interrupted:")
    # Images already handed to the workers are finished and recorded, not lost.
    lines = by_index(records(out))
    assert any(line["status"] == "ok" for line in lines.values()), stdout


class InterruptWhileRecording:
    """An Observer that sends this process SIGINT while the ``at``-th result is recorded:
    a Ctrl-C that lands while the main thread runs ``emit``, not while it waits."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0

    def start(self, to_run: int | None, kept: int) -> None:
        pass

    def result(self, result: object) -> None:
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize(
    "backend",
    ["sync", "threads", "asyncio", "processes", "hybrid"],
)
def test_interrupt_while_recording_leaves_no_unrecorded_image(
    backend: str, image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    url = image_server.base + "/{width}/{height}?lock={i}"
    report = run(make_settings(backend, out, url, 40), InterruptWhileRecording(at=5))

    assert report.interrupted
    lines = settled_lines(out)
    assert 5 <= len(lines) < 40
    recorded = {line["path"] for line in lines.values() if line["status"] == "ok"}
    on_disk = {p.name for p in visible_files(out) if p.parent == out and p.name != MANIFEST}
    assert on_disk - recorded == set(), "images on disk that the manifest does not record"


def test_interrupt_inside_an_asyncio_task_is_quiet(
    image_server: ImageServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A signal that lands while a task's own code runs (here: in emit) stops the run with
    no "Task exception was never retrieved" traceback: a task's own exception must be
    retrieved, or asyncio logs it when the task is collected."""
    url = image_server.base + "/{width}/{height}?lock={i}"
    settings = make_settings("asyncio", tmp_path / "pic", url, 40)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        report = run(settings, InterruptWhileRecording(at=5))
        gc.collect()  # an unretrieved task exception is reported when the task is collected
    assert report.interrupted
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_stop_token_first_reason_wins_and_callbacks_run_once() -> None:
    token = StopToken()
    calls: list[str] = []
    forget = token.on_set(lambda: calls.append("a"))
    token.on_set(lambda: calls.append("b"))
    forget()
    assert not token.is_set() and not token.wait(0)
    token.set("first")
    token.set("second")
    assert token.is_set() and token.wait(0) and token.reason == "first"
    assert calls == ["b"]
    token.on_set(lambda: calls.append("late"))  # already set: called at once
    assert calls == ["b", "late"]


def test_stop_token_wakes_a_waiting_thread() -> None:
    token = StopToken()
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: token.wait() and woke.set())
    waiter.start()
    token.set()
    waiter.join(DEADLINE_S)
    assert woke.is_set()


class StopAfter:
    """An Observer that tells the test's thread once ``at`` results are recorded."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.reached = threading.Event()

    def start(self, to_run: int | None, kept: int) -> None:
        pass

    def result(self, result: object) -> None:
        self.seen += 1
        if self.seen >= self.at:
            self.reached.set()


def run_in_thread(settings: Settings, stop: StopToken, observer: Any = None) -> Any:
    """``download()`` on a thread of its own; returns (thread, box of the report)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["report"] = run(settings, observer, stop=stop)
        except BaseException as exc:  # the test's thread reports it
            box["error"] = exc

    thread = threading.Thread(target=target, name="download")
    thread.start()
    return thread, box


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_a_stop_token_set_from_another_thread_stops_the_run(backend: str, tmp_path: Path) -> None:
    count = 300
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=6, latency_ms=30))) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        stop, observer = StopToken(), StopAfter(at=8)
        thread, box = run_in_thread(make_settings(backend, out, url, count), stop, observer)
        assert observer.reached.wait(DEADLINE_S), box.get("error")
        stop.set("test")
        thread.join(DEADLINE_S)
    assert not thread.is_alive()
    report = box["report"]
    assert report.interrupted and report.stop_reason == "test"
    lines = settled_lines(out)
    assert 8 <= len(lines) < count, "the stop should land mid-run"
    assert report.ok + report.failed == len(lines)
    assert_ok_files_match(out, lines)
    recorded = {line["path"] for line in lines.values() if line["status"] == "ok"}
    on_disk = {p.name for p in visible_files(out) if p.parent == out and p.name != MANIFEST}
    assert on_disk == recorded, "every image on disk has its manifest line"


@pytest.mark.parametrize("backend", ["sync", "threads", "asyncio", "hybrid"])
def test_a_stop_cuts_slow_requests_short(backend: str, tmp_path: Path) -> None:
    """The server takes 60 s to answer: a stop ends the requests in flight instead of
    waiting for them (the processes backend drains them, bounded by --timeout)."""
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=2, latency_ms=60_000))) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        settings = make_settings(backend, out, url, 4, timeout=120.0, concurrency=2)
        stop = StopToken()
        thread, box = run_in_thread(settings, stop)
        wait_for(lambda: sum(server_stats(server).values()) >= 1, "a request in flight")
        stop.set()
        thread.join(20)
        assert not thread.is_alive(), "the stop waited for the slow server"
    assert box["report"].interrupted, box.get("error")
    assert records(out) == []
    assert [p for p in visible_files(out) if p.name != MANIFEST] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stop_ends_a_wait_on_a_silent_stdin(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--urls - fed by a producer that wrote one URL and then says nothing, forever: a
    stop still ends the run (the jobs are read ahead on a thread)."""
    with server_thread(make_app(ServerSettings(seed=2))) as server:
        read_end, write_end = os.pipe()
        os.write(write_end, f"{server.base_url}/320/240?lock=0\n".encode())
        with os.fdopen(read_end) as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            out = tmp_path / "pic"
            settings = make_settings(backend, out, "http://unused/{i}", 1).replace(urls="-")
            stop = StopToken()
            thread, box = run_in_thread(settings, stop)
            if backend in ("threads", "processes"):
                # Their pool hands a result over only once the next job came (or none).
                wait_for(lambda: server_stats(server)["image"] >= 1, "the first image served")
            else:  # recorded: the run has gone back to waiting for the producer
                wait_for(lambda: len(complete_lines(out)) >= 1, "the first manifest line")
            stop.set()
            thread.join(DEADLINE_S)
            alive = thread.is_alive()
            os.close(write_end)  # the end of the stream, to let a stuck run go
    assert not alive, "the run waited for the silent producer"
    assert box["report"].interrupted, box.get("error")
    lines = by_index(records(out))
    assert set(lines) <= {0}
    on_disk = {p.name for p in visible_files(out) if p.parent == out and p.name != MANIFEST}
    assert on_disk == {line["path"] for line in lines.values() if line["status"] == "ok"}
