"""The request deadline (``--timeout``) bounds a whole request: a server that trickles its
body or its headers, each piece well within the timeout, is cut off at the deadline.

A client that only timed single reads would receive every piece in time and finish: the
trickled body would end as a good image, the trickled headers as a response. So the
``timed out`` failure itself shows the deadline cut the request short; the time taken is
only checked from below (it waited out the deadline, not less)."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
from helpers import server_stats

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


class TricklingServer:
    """A raw server that answers any request, a direct one or one sent to it as a proxy (an
    absolute-form GET or a CONNECT), with a status line and headers one byte at a time."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.request_lines: list[bytes] = []
        self.hung_up: list[bool] = []  # per connection: the client left mid-headers
        self.stop = threading.Event()
        self.served = threading.Event()  # a connection was answered, or left
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.request_lines.append(conn.recv(4096).split(b"\r\n", 1)[0])
                self.hung_up.append(self._trickle(conn))
                self.served.set()

    def _trickle(self, conn: socket.socket) -> bool:
        """Whether the client hung up before the last header byte was sent."""
        for byte in HEADERS:
            try:
                conn.sendall(bytes([byte]))
                readable, _, _ = select.select([conn], [], [], BYTE_GAP_S)
                if readable and not conn.recv(1):
                    return True
            except OSError:
                return True
            if self.stop.is_set():  # the test is over: stop at once
                break
        return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def trickler() -> Iterator[TricklingServer]:
    server = TricklingServer()
    yield server
    server.close()


@pytest.fixture
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # urllib's CGI rule for HTTP_PROXY
    return monkeypatch


def _fetch_cut_at_the_deadline(url: str, trickler: TricklingServer) -> None:
    http = HttpSettings(timeout=1.0, retries=0)
    start = time.monotonic()
    with new_session(http) as session, pytest.raises(RetryableFetchError, match="timed out"):
        fetch_sync(session, url, http)
    assert time.monotonic() - start >= http.timeout - SLACK_S
    # Cut, not merely late: a client that waited for the headers to end would also call
    # the request timed out, but would not have left before the server was done.
    assert trickler.served.wait(10)
    assert trickler.hung_up == [True]


def test_requests_deadline_covers_trickling_headers(
    trickler: TricklingServer, no_proxy_variables: pytest.MonkeyPatch
) -> None:
    _fetch_cut_at_the_deadline(f"http://{trickler.address}/x.jpg", trickler)
    assert trickler.request_lines == [b"GET /x.jpg HTTP/1.1"]


def test_requests_deadline_covers_a_proxy_trickling_headers(
    trickler: TricklingServer, no_proxy_variables: pytest.MonkeyPatch
) -> None:
    # requests keeps the connections to a proxy in pools of their own: the deadline must
    # track those too. images.test resolves nowhere: only the proxy can be asked for it.
    no_proxy_variables.setenv("HTTP_PROXY", f"http://{trickler.address}")
    _fetch_cut_at_the_deadline("http://images.test/x.jpg", trickler)
    assert trickler.request_lines == [b"GET http://images.test/x.jpg HTTP/1.1"]


def test_requests_deadline_covers_a_proxy_trickling_its_connect_answer(
    trickler: TricklingServer, no_proxy_variables: pytest.MonkeyPatch
) -> None:
    # An https:// URL through a proxy: the CONNECT answer is read before the connection is
    # complete, so its socket is under the deadline from the moment it is made.
    no_proxy_variables.setenv("HTTPS_PROXY", f"http://{trickler.address}")
    _fetch_cut_at_the_deadline("https://images.test/x.jpg", trickler)
    (line,) = trickler.request_lines  # http.client says CONNECT in HTTP/1.0
    assert line.split()[:2] == [b"CONNECT", b"images.test:443"]
