"""A total deadline for requests, which has none of its own.

requests' timeout bounds each socket read, so a server that trickles its headers or its
body one byte at a time, or redirects slowly again and again, never trips it. Here every
socket a request uses (each redirect hop, fresh or reused from the pool, direct or to an
http(s) proxy; a socks proxy's are not) is recorded, and
one watchdog thread per process shuts them down when the request's deadline passes: the
blocked read wakes with an error, and the fetch shell reports a timeout.

The same cut ends a request at once when the run's stop token is set (``cut_short_by``):
Ctrl-C need not wait for a slow server.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager, ProxyManager

if TYPE_CHECKING:
    from .stop import StopToken

# .sockets: the sockets of this thread's current request; .stop: the run's stop token
_in_flight = threading.local()


def _record(sock: socket.socket | None) -> None:
    sockets: list[socket.socket] | None = getattr(_in_flight, "sockets", None)
    if sockets is not None and sock is not None:
        sockets.append(sock)
        stop: StopToken | None = getattr(_in_flight, "stop", None)
        if stop is not None and stop.is_set():  # opened after the stop's cut: cut it too
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Tracked(HTTPConnection):
    """Reports each socket of a connection to ``request_deadline`` (plain and TLS alike:
    the TLS connection below takes this first in its MRO)."""

    def _new_conn(self) -> socket.socket:
        # Recorded as soon as it is made: a proxy's CONNECT answer (read in connect(),
        # before the TLS handshake) is under the deadline too.
        sock = super()._new_conn()
        _record(sock)
        return sock

    def connect(self) -> None:
        super().connect()
        _record(self.sock)  # the TLS socket, which replaced the plain one

    def request(self, *args: Any, **kwargs: Any) -> None:
        _record(self.sock)  # a connection reused from the pool: connect() is not called again
        super().request(*args, **kwargs)


class _TrackedHTTPConnection(_Tracked):
    pass


class _TrackedHTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


_TRACKED_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report their sockets to ``request_deadline``."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_TRACKED_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        # requests makes a manager of its own for each proxy, with urllib3's pools: without
        # this, a request sent through a proxy would be cut by no deadline.
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # http(s) proxies; socks has pools of its own
            manager.pool_classes_by_scheme = dict(_TRACKED_POOLS)
        return manager


@contextlib.contextmanager
def cut_short_by(stop: StopToken | None) -> Iterator[None]:
    """Within this block, this thread's requests end as soon as ``stop`` is set."""
    _in_flight.stop = stop
    try:
        yield
    finally:
        _in_flight.stop = None


@contextlib.contextmanager
def request_deadline(deadline: float) -> Iterator[None]:
    """Within this block, this thread's request is cut off at ``deadline`` (monotonic),
    or when the stop token of ``cut_short_by`` is set."""
    stop: StopToken | None = getattr(_in_flight, "stop", None)
    if stop is not None and stop.is_set():
        raise requests.ConnectionError("the run was stopped")
    sockets: list[socket.socket] = []
    _in_flight.sockets = sockets

    def abort() -> None:
        # May run in a signal handler (through the stop token): a syscall per socket only.
        for sock in list(sockets):
            _shut(sock)

    handle = _watchdog.arm(deadline, abort)
    try:
        with stop.calling(abort) if stop is not None else contextlib.nullcontext():
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
