"""The request deadline (``--timeout``) bounds a whole request: a server that trickles its
body or its headers, each piece well within the timeout, is cut off at the deadline.

A client that only timed single reads would receive every piece in time and finish: the
trickled body would end as a good image, the trickled headers as a response. So the
``timed out`` failure itself shows the deadline cut the request short; the time taken is
only checked from below (it waited out the deadline, not less)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
from conftest import server_stats

from downloader.errors import RetryableFetchError
from downloader.fetch import fetch_async, fetch_sync, new_session
from downloader.server import RunningServer, make_app, server_thread
from downloader.settings import HttpSettings, ServerSettings

DEADLINE = HttpSettings(timeout=1.0, retries=0)
SLACK_S = 0.05  # the clock read before the call and the deadline's own clock differ a little


@pytest.fixture
def trickle() -> Iterator[RunningServer]:
    """Every entry URL's first request gets a body trickled over 5 s (a piece every 0.25 s)."""
    with server_thread(make_app(ServerSettings(seed=2, slow_rate=1.0, slow_ms=5000))) as server:
        yield server


def test_fetch_sync_deadline_cuts_a_trickling_body(trickle: RunningServer) -> None:
    url = trickle.base_url + "/320/240?lock=1"
    session = new_session(DEADLINE)
    start = time.monotonic()
    try:
        with pytest.raises(RetryableFetchError, match="timed out") as info:
            fetch_sync(session, url, DEADLINE)
    finally:
        session.close()
    elapsed = time.monotonic() - start
    assert info.value.attempts == 1
    assert server_stats(trickle)["fault:slow"] == 1  # the body really was a trickle
    assert elapsed >= DEADLINE.timeout - SLACK_S


async def test_fetch_async_deadline_cuts_a_trickling_body(trickle: RunningServer) -> None:
    url = trickle.base_url + "/320/240?lock=2"
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(RetryableFetchError, match="timed out") as info:
            await fetch_async(session, url, DEADLINE)
    elapsed = time.monotonic() - start
    assert info.value.attempts == 1
    counts = await asyncio.to_thread(server_stats, trickle)
    assert counts["fault:slow"] == 1
    assert elapsed >= DEADLINE.timeout - SLACK_S


HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Slow: yes\r\n\r\n"
BYTE_GAP_S = 0.1  # one header byte every 0.1 s: all of them take ~6 s


@pytest.fixture
def trickling_headers() -> Iterator[str]:
    """A raw server that sends its status line and headers one byte at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                for byte in HEADERS:
                    with contextlib.suppress(OSError):
                        conn.sendall(bytes([byte]))
                    if stop.wait(BYTE_GAP_S):  # the test is over: stop at once
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg"
    stop.set()
    thread.join(5)
    listener.close()


def test_requests_deadline_covers_trickling_headers(trickling_headers: str) -> None:
    http = HttpSettings(timeout=1.0, retries=0)
    start = time.monotonic()
    with new_session(http) as session, pytest.raises(RetryableFetchError, match="timed out"):
        fetch_sync(session, trickling_headers, http)
    assert time.monotonic() - start >= http.timeout - SLACK_S
