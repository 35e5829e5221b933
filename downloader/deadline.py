"""A total deadline for requests, which has none of its own.

requests' timeout bounds each socket read, so a server that trickles its headers or its
body one byte at a time, or redirects slowly again and again, never trips it. Here every
socket a request uses (each redirect hop, fresh or reused from the pool) is recorded, and
one watchdog thread per process shuts them down when the request's deadline passes: the
blocked read wakes with an error, and the fetch shell reports a timeout.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_in_flight = threading.local()  # .sockets: the sockets of this thread's current request


def _record(conn: HTTPConnection) -> None:
    sockets: list[socket.socket] | None = getattr(_in_flight, "sockets", None)
    if sockets is not None and conn.sock is not None:
        sockets.append(conn.sock)


class _TrackedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _record(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _record(self)  # a connection reused from the pool: connect() is not called again
        super().request(*args, **kwargs)


class _TrackedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _record(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _record(self)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report their sockets to ``request_deadline``."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


@contextlib.contextmanager
def request_deadline(deadline: float) -> Iterator[None]:
    """Within this block, this thread's request is cut off at ``deadline`` (monotonic)."""
    sockets: list[socket.socket] = []
    _in_flight.sockets = sockets

    def abort() -> None:
        for sock in list(sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    handle = _watchdog.arm(deadline, abort)
    try:
        yield
    finally:
        _Watchdog.disarm(handle)
        _in_flight.sockets = None


Handle = list[Callable[[], None] | None]


class _Watchdog:
    """One thread per process running each action whose deadline has passed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, action: Callable[[], None]) -> Handle:
        handle: Handle = [action]
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), handle))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="deadline")
                self._thread.start()
            self._cond.notify()
        return handle

    @staticmethod
    def disarm(handle: Handle) -> None:
        handle[0] = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                _, _, handle = heapq.heappop(self._heap)
            action = handle[0]
            if action is not None:
                with contextlib.suppress(Exception):
                    action()


_watchdog = _Watchdog()
