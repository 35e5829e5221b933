"""Politeness toward a host: --rate spacing (a fake clock and the real one), a pause that
holds one host only, and a 429 that pauses every request to the host on every backend
that shares a gate.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import responses
from aiohttp import web
from helpers import (
    FakeAsyncSleep,
    jpeg,
    make_settings,
)

from downloader import politeness
from downloader.fetch import fetch_async, fetch_sync, new_session
from downloader.pipeline import run
from downloader.politeness import HostGate, host_of
from downloader.server import server_thread
from downloader.settings import HttpSettings, ThumbnailSettings


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
    Arrival times are recorded with time.monotonic, the clock HostGate uses.

    ``hold_s`` is also the time hybrid has to relay the pause from the worker that heard
    the 429, through the parent, to the others: it must stay under the 1 s pause, or a
    relay that never happens could not be seen."""

    def __init__(self, hold_s: float = 0.6) -> None:
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


def test_a_retry_sleeps_out_the_host_pause(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host paused by another request while this one's attempt failed: the retry's own
    sleep (injected, and cut short by a stop) waits out that pause, not the gate."""
    url = "http://paused.test/1.jpg"
    gate = HostGate()
    gate_waits: list[float] = []

    def wait_at_gate(target: str) -> None:  # the gate's wait, on the fake clock
        gate_waits.append(gate.reserve(host_of(target)))
        clock.now += gate_waits[-1]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    def paused_by_another(request: object) -> tuple[int, dict[str, str], bytes]:
        gate.pause(host_of(url), 2.0)  # say, a sibling request's 429
        return 503, {}, b""

    slept: list[float] = []
    monkeypatch.setattr(gate, "wait_sync", wait_at_gate)
    http = HttpSettings(retries=1, backoff=0.01, max_backoff=30)
    with responses.RequestsMock() as rsps, new_session(http) as session:
        rsps.add_callback(responses.GET, url, callback=paused_by_another)
        rsps.get(url, body=jpeg(0), content_type="image/jpeg")
        fetched = fetch_sync(session, url, http, sleep=sleep, gate=gate)
    assert fetched.attempts == 2
    assert slept == [pytest.approx(2.0)]  # the backoff alone is at most 0.01 s
    assert gate_waits == [0.0, 0.0]
