"""Robustness: injected faults, kill -9 then --resume, Ctrl-C/SIGTERM, --retry-failed,
politeness toward a throttling host, and bad input at the CLI (the request deadline:
test_deadline).

Everything talks to a server on a loopback port. Nothing waits a fixed time for something
to happen: the tests poll with a deadline and assert on behaviour (what was requested, in
which order, what ended up on disk), never on absolute durations.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import (
    BACKENDS,
    CONTRACT_BACKENDS,
    DEADLINE_S,
    FakeAsyncSleep,
    ImageServer,
    alive,
    by_index,
    cli_args,
    complete_lines,
    entry_key,
    grandchildren,
    jpeg,
    launched,
    make_settings,
    manifest_text,
    records,
    run_cli,
    server_stats,
    tree_after_lines,
    wait_for,
)
from PIL import Image

from downloader import politeness
from downloader.cli import main as cli_main
from downloader.fetch import fetch_async
from downloader.pipeline import run
from downloader.politeness import HostGate, host_of
from downloader.server import RunningServer, choose_fault, make_app, server_thread
from downloader.settings import HttpSettings, ServerSettings, Settings, ThumbnailSettings
from downloader.stop import StopToken
from downloader.storage import MANIFEST, TEMP_SUFFIX

# ---------------------------------------------------------------------------- helpers


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def visible_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]


def assert_no_temp_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert leftovers == []


def assert_visible_images_decode(out: Path) -> None:
    """A killed run may leave hidden temp files, never a partial image under its real name."""
    for path in visible_files(out):
        if path.name == MANIFEST:
            continue
        assert not path.name.endswith(TEMP_SUFFIX), path
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()  # raises on a truncated or corrupt file


def assert_ok_files_match(out: Path, lines: dict[int, dict[str, Any]]) -> None:
    for index, line in lines.items():
        if line["status"] != "ok":
            continue
        data = (out / line["path"]).read_bytes()
        assert sha(data) == line["sha256"], index
        assert len(data) == line["bytes"], index
        if line["thumbnail"] is not None:
            assert (out / line["thumbnail"]).is_file(), index


# ---------------------------------------------------------------------------- 1. faults


FAULTY = ServerSettings(
    seed=8,  # 1 stall among the 200 URLs: each costs the sync backend one whole timeout
    fail_rate=0.10,
    throttle_rate=0.05,
    reset_rate=0.05,
    truncate_rate=0.05,
    stall_rate=0.02,
    retry_after=0,
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_image_survives_injected_faults(backend: str, tmp_path: Path) -> None:
    count = 200
    out = tmp_path / "pic"
    expected = {i: choose_fault(FAULTY, entry_key(i)) for i in range(count)}
    with server_thread(make_app(FAULTY)) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        report = run(make_settings(backend, out, url, count, timeout=1.0, retries=3))
        counts = server_stats(server)
        served: dict[str, bytes] = {}
        lines = by_index(records(out))
        for line in lines.values():
            if line["status"] == "ok" and line["final_url"] not in served:
                served[line["final_url"]] = get_bytes(line["final_url"])

    failures = {i: line["error"] for i, line in lines.items() if line["status"] != "ok"}
    assert failures == {}
    assert (report.ok, report.failed) == (count, 0)
    assert sorted(lines) == list(range(count))
    for index, line in lines.items():
        data = (out / line["path"]).read_bytes()
        assert data == served[line["final_url"]], index
        assert sha(data) == line["sha256"]
        if expected[index] is not None:  # the first attempt was broken: the bytes are a retry's
            assert line["attempts"] >= 2, (index, expected[index])
    assert_no_temp_files(out)

    # The faults really were injected, each on exactly the URLs the seed picks for it.
    injected = {kind: n for kind, n in Counter(expected.values()).items() if kind is not None}
    assert set(injected) == {"fail", "throttle", "reset", "truncate", "stall"}
    for kind, n in injected.items():
        assert counts[f"fault:{kind}"] == n, kind
    assert counts["entry"] >= count + sum(injected.values())


# ---------------------------------------------------------------------------- 2. kill -9


@pytest.mark.parametrize("backend", ["asyncio", "processes", "hybrid"])
def test_kill_9_then_resume_fetches_only_what_is_missing(backend: str, tmp_path: Path) -> None:
    count = 120
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=5, latency_ms=30))) as server:
        args = cli_args(backend, server.base_url, out, count)
        with launched(args, tmp_path) as proc:
            tree = tree_after_lines(out, 20, proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        killed = by_index(records(out))  # every complete line is valid JSON
        assert 20 <= len(killed) < count, "the kill should land mid-run"
        assert_visible_images_decode(out)
        assert_ok_files_match(out, killed)
        kept = {i for i, line in killed.items() if line["status"] == "ok"}

        before = server_stats(server)
        resumed = run_cli([*args, "--resume"], tmp_path)
        after = server_stats(server)

    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert f"{len(kept)} kept" in resumed.stdout
    lines = by_index(records(out))
    assert manifest_text(out).endswith("\n")
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())
    assert_ok_files_match(out, lines)
    assert_no_temp_files(out)  # the killed run's temp files were swept
    assert_visible_images_decode(out)

    again = {i for i in range(count) if after[entry_key(i)] != before[entry_key(i)]}
    assert again & kept == set(), "an image recorded ok was fetched again"
    assert again == set(range(count)) - kept, "every image not recorded ok is fetched"

    # The pool workers and the forkserver of the killed run did not outlive it.
    wait_for(lambda: not any(alive(pid) for pid in tree), "the killed run's children to exit")


# ---------------------------------------------------------------------------- 3. signals


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
    out = tmp_path / "pic"
    with server_thread(make_app(ServerSettings(seed=6, latency_ms=30))) as server:
        args = cli_args(backend, server.base_url, out, count)
        with launched(args, tmp_path) as proc:
            tree = tree_after_lines(out, 10, proc)
            # To the main process only: a terminal's Ctrl-C signals the whole group, which
            # can kill a pool worker (processes, or the thumbnail pool) that is still
            # starting, see test_ctrl_c_while_pool_workers_start.
            os.kill(proc.pid, signum)
            stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    summary = [line for line in stdout.splitlines() if line.startswith("interrupted:")]
    assert len(summary) == 1, stdout
    assert_no_temp_files(out)
    assert manifest_text(out).endswith("\n")  # no torn line after a clean stop
    lines = by_index(records(out))
    assert 10 <= len(lines) < count, "the signal should land mid-run"
    assert set(lines) <= set(range(count))
    assert_ok_files_match(out, lines)
    assert_visible_images_decode(out)
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
    [
        "sync",
        "threads",
        "processes",
        "hybrid",
        # asyncio: an in-flight write finishes in aiofiles' thread after its task was
        # cancelled, so an unrecorded file is left now and then (a race, not asserted here).
    ],
)
def test_interrupt_while_recording_leaves_no_unrecorded_image(
    backend: str, image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    url = image_server.base + "/{width}/{height}?lock={i}"
    report = run(make_settings(backend, out, url, 40), InterruptWhileRecording(at=5))

    assert report.interrupted
    assert manifest_text(out).endswith("\n")
    lines = by_index(records(out))
    assert 5 <= len(lines) < 40
    assert_no_temp_files(out)
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
    assert_no_temp_files(out)
    assert manifest_text(out).endswith("\n")
    lines = by_index(records(out))
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


# ---------------------------------------------------------------------------- 4. retry/resume


class Flip:
    """``/flip/{i}``: odd indices answer 404 until ``healed``; counts every request."""

    def __init__(self) -> None:
        self.healed = False
        self.hits: Counter[int] = Counter()

    def app(self) -> web.Application:
        app = make_app(ServerSettings(seed=1))

        async def flip(request: web.Request) -> web.Response:
            index = int(request.match_info["i"])
            self.hits[index] += 1
            if index % 2 and not self.healed:
                raise web.HTTPNotFound(text="not yet")
            return web.Response(body=jpeg(index % 7), content_type="image/jpeg")

        app.router.add_get("/flip/{i}", flip)
        return app


@pytest.fixture
def flip() -> Iterator[tuple[Flip, RunningServer]]:
    state = Flip()
    with server_thread(state.app()) as server:
        yield state, server


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_failed_requests_only_the_failed(
    backend: str, flip: tuple[Flip, RunningServer], tmp_path: Path
) -> None:
    state, server = flip
    count = 12
    out = tmp_path / "pic"
    settings = make_settings(backend, out, server.base_url + "/flip/{i}", count)
    first = run(settings)
    assert (first.ok, first.failed) == (count // 2, count // 2)
    failed = {i for i, line in by_index(records(out)).items() if line["status"] != "ok"}
    assert failed == set(range(1, count, 2))

    state.healed = True
    before = state.hits.copy()
    second = run(settings.replace(retry_failed=True))

    requested = {i for i in range(count) if state.hits[i] != before[i]}
    assert requested == failed
    assert all(state.hits[i] - before[i] == 1 for i in failed)
    assert (second.ok, second.failed, second.skipped) == (len(failed), 0, count - len(failed))
    lines = by_index(records(out))
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())
    assert_ok_files_match(out, lines)


def test_retry_failed_keeps_a_line_for_every_index(
    flip: tuple[Flip, RunningServer], tmp_path: Path
) -> None:
    state, server = flip
    count = 6
    out = tmp_path / "pic"
    settings = make_settings("sync", out, server.base_url + "/flip/{i}", count)
    run(settings)
    first = by_index(records(out))
    (out / first[0]["path"]).unlink()  # an ok image whose file was deleted since

    state.healed = True
    run(settings.replace(retry_failed=True))

    # Whether index 0 is fetched again or its old line kept, the manifest still covers it.
    assert sorted(by_index(records(out))) == list(range(count))


def test_resume_refetches_only_missing_altered_and_torn(
    flip: tuple[Flip, RunningServer], tmp_path: Path
) -> None:
    state, server = flip
    state.healed = True
    count = 10
    out = tmp_path / "pic"
    settings = make_settings("threads", out, server.base_url + "/flip/{i}", count)
    assert run(settings).ok == count

    text = manifest_text(out)
    lines = text.splitlines()
    torn = json.loads(lines[-1])["index"]
    # Tear the last line as a crash mid-write would: half of it, no newline.
    (out / MANIFEST).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    deleted, altered, no_thumb = [i for i in range(count) if i != torn][:3]
    old = by_index(records(out))
    (out / old[deleted]["path"]).unlink()
    altered_path = out / old[altered]["path"]
    altered_path.write_bytes(altered_path.read_bytes()[:-10] + b"\0" * 10)
    (out / old[no_thumb]["thumbnail"]).unlink()

    before = state.hits.copy()
    report = run(settings.replace(resume=True))

    requested = {i for i in range(count) if state.hits[i] != before[i]}
    assert requested == {torn, deleted, altered, no_thumb}
    assert (report.ok, report.failed, report.skipped) == (4, 0, count - 4)
    lines_after = by_index(records(out))
    assert manifest_text(out).endswith("\n")
    assert sorted(lines_after) == list(range(count))
    assert all(line["status"] == "ok" for line in lines_after.values())
    assert_ok_files_match(out, lines_after)
    assert_visible_images_decode(out)


# ---------------------------------------------------------------------------- 5. politeness


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """HostGate's clock, and only its clock, under the test's control."""
    fake = FakeClock()
    monkeypatch.setattr(politeness, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_rate_spaces_slots_by_one_over_rate(clock: FakeClock) -> None:
    gate = HostGate(rate=20)
    delays = [gate.reserve("a:1") for _ in range(10)]
    assert delays == pytest.approx([k / 20 for k in range(10)])
    assert gate.reserve("b:1") == 0.0  # another host has its own slots
    clock.now += 0.2  # time passes: the queue drains by as much
    assert gate.reserve("a:1") == pytest.approx(10 / 20 - 0.2)


def test_rate_spacing_on_the_real_clock() -> None:
    """Slots start (now + delay) 1/rate apart while requests queue, never closer. Each start
    is bracketed by the clock read just before and after its call, so a busy machine needs
    no tolerance: a call delayed past its slot just starts later (and then waits 0)."""
    gate = HostGate(rate=20)
    slots = []
    for _ in range(10):
        before = time.monotonic()
        delay = gate.reserve("a:1")
        after = time.monotonic()
        slots.append((before + delay, after + delay, delay))
    for (lo0, hi0, _), (lo1, hi1, delay1) in itertools.pairwise(slots):
        assert hi1 - lo0 >= 1 / 20 - 1e-9  # never closer than 1/rate
        if delay1 > 0:  # it queued: exactly one interval after the previous slot
            assert lo1 - hi0 <= 1 / 20 + 1e-9


def test_pause_holds_one_host_only(clock: FakeClock) -> None:
    gate = HostGate()
    gate.pause("a:1", 2)
    assert gate.reserve("a:1") == pytest.approx(2.0)
    assert gate.reserve("b:1") == 0.0
    gate.pause("a:1", 1)  # a shorter pause does not cut a longer one short
    assert gate.reserve("a:1") == pytest.approx(2.0)
    clock.now += 2.5
    assert gate.reserve("a:1") == 0.0


def test_pause_and_rate_together(clock: FakeClock) -> None:
    gate = HostGate(rate=10)
    gate.pause("a:1", 1)
    assert [gate.reserve("a:1") for _ in range(3)] == pytest.approx([1.0, 1.1, 1.2])


class Throttler:
    """``/p/{i}``: the very first request gets 429 with Retry-After: 1; the others are
    answered after ``hold_s`` (so the first burst is still in flight when the 429 lands).
    Arrival times are recorded with time.monotonic, the clock HostGate uses."""

    def __init__(self, hold_s: float = 0.3) -> None:
        self.hold_s = hold_s
        self.arrivals: list[tuple[float, int]] = []
        self.throttled_at: float | None = None

    def app(self) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            index = int(request.match_info["i"])
            self.arrivals.append((time.monotonic(), index))
            if self.throttled_at is None:
                self.throttled_at = time.monotonic()
                raise web.HTTPTooManyRequests(headers={"Retry-After": "1"}, text="slow down")
            await asyncio.sleep(self.hold_s)
            return web.Response(body=jpeg(index % 5), content_type="image/jpeg")

        app = web.Application()
        app.router.add_get("/p/{i}", handler)
        return app


@pytest.mark.parametrize("backend", ["asyncio", "threads", "hybrid"])
def test_429_pauses_every_request_to_the_host(backend: str, tmp_path: Path) -> None:
    concurrency, count = 4, 10
    throttler = Throttler()
    with server_thread(throttler.app()) as server:
        settings = make_settings(
            backend,
            tmp_path / "pic",
            server.base_url + "/p/{i}",
            count,
            concurrency=concurrency,
            max_backoff=5.0,  # so Retry-After: 1 is honoured in full
        ).replace(thumbnails=ThumbnailSettings(size=0, executor="inline"))
        report = run(settings)

    assert (report.ok, report.failed) == (count, 0)
    assert throttler.throttled_at is not None
    first = throttler.arrivals[0][1]
    attempts = {r.index: r.attempts for r in report.results}
    assert attempts[first] == 2 and all(a == 1 for i, a in attempts.items() if i != first)
    # The first burst was sent before anyone heard the 429; every later request (the retry
    # included) must wait out the pause, which began no earlier than the 429 was answered.
    later = [t for t, _ in sorted(throttler.arrivals)[concurrency:]]
    assert len(later) == count - concurrency + 1
    pause_end = throttler.throttled_at + 1.0
    early = [round(t - throttler.throttled_at, 3) for t in later if t < pause_end - 0.005]
    assert early == [], "requests reached the host while it had asked for a pause"


async def test_fetch_async_pauses_the_gate_on_429() -> None:
    throttler = Throttler(hold_s=0)
    pauses: list[tuple[str, float]] = []
    waits = FakeAsyncSleep()

    class RecordingGate(HostGate):
        def pause(self, host: str, seconds: float) -> None:
            pauses.append((host, seconds))
            super().pause(host, seconds)

    with server_thread(throttler.app()) as server:
        url = server.base_url + "/p/0"
        gate = RecordingGate()
        http = HttpSettings(retries=2, backoff=0.01, max_backoff=5.0, timeout=10)
        async with aiohttp.ClientSession() as session:
            fetched = await fetch_async(session, url, http, sleep=waits, gate=gate)

    assert fetched.attempts == 2
    assert pauses == [(host_of(url), 1.0)]
    assert waits.calls == [1.0]  # the retry policy honours Retry-After as well
    # The retry went through the gate: it reached the server after the pause ended.
    assert throttler.throttled_at is not None
    assert throttler.arrivals[1][0] >= throttler.throttled_at + 1.0 - 0.005


# ---------------------------------------------------------------------------- 6. bad input

# tests/test_settings_cli.py covers count, backend, config files, concurrency, timeout,
# URL scheme and placeholders, OUT as a file, env, unknown flag, size and retries.
MORE_BAD_INPUTS = [
    pytest.param(["--out", "afile/sub"], "afile/sub", id="out-under-a-file"),
    pytest.param(["--out", "/proc/self/pic"], "/proc/self/pic", id="out-under-proc"),
    pytest.param(["--out", "/sys/kernel"], "/sys/kernel", id="out-not-writable"),
    pytest.param(["--out", "/dev/null"], "/dev/null", id="out-is-a-device"),
    pytest.param(["--rate", "abc"], "abc", id="rate-not-a-number"),
    pytest.param(["--rate", "5/m"], "5/m", id="rate-per-minute"),
    pytest.param(["--rate", "-1"], "http.rate", id="rate-negative"),
    pytest.param(["--fail-rate", "2"], "fail_rate", id="fail-rate-over-1"),
    pytest.param(["--stall-rate", "-0.1"], "stall_rate", id="stall-rate-negative"),
    pytest.param(["--fail-rate", "0.6", "--reset-rate", "0.6"], "add up", id="rates-over-1"),
    pytest.param(["--latency-ms", "-5"], "latency_ms", id="latency-negative"),
    pytest.param(["--timeout", "0"], "timeout", id="timeout-zero"),
    pytest.param(["--size", "0x10"], "width", id="size-zero"),
    pytest.param(["--thumbnail-size", "-1"], "thumbnails.size", id="thumbnail-size-negative"),
    pytest.param(["--url", "http://h/{i"], "template", id="url-unclosed-brace"),
    pytest.param(["--url", "http:///{i}"], "host", id="url-no-host"),
    pytest.param(["--url", "ftp://h/{i}"], "http", id="url-ftp"),
    pytest.param(["--url", "http://h/{i:>5}"], "spaces", id="url-format-spec-spaces"),
    pytest.param(["--config", "cdir"], "cdir", id="config-is-a-folder"),
    pytest.param(["--config", "latin1.toml"], "UTF-8", id="config-not-utf8"),
]


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scrubbed_env: None) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("I am a file, not a folder\n")
    (tmp_path / "cdir").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b'keywords = "caf\xe9"\n')
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize(("args", "fragment"), MORE_BAD_INPUTS)
def test_more_bad_input_is_one_error_line(scratch: Path, args: list[str], fragment: str) -> None:
    before = snapshot(scratch)
    result = CliRunner().invoke(cli_main, args)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(scratch) == before  # no OUT, no manifest, nothing changed


def test_bad_input_through_the_real_console_script(scratch: Path) -> None:
    result = run_cli(["--rate", "abc", "--out", "pic"], scratch)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert not (scratch / "pic").exists()
