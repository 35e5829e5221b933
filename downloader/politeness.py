"""Politeness toward each host: an optional request rate, and a pause that a 429 or a
``Retry-After`` imposes on every request to that host, not just the one that got it.

One ``HostGate`` is shared by all requests of a process (threads and tasks alike). The
processes and hybrid backends have one per worker, so they divide the rate among them;
hybrid workers also pass each pause they hear on to the others, through the parent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from urllib.parse import urlsplit


def host_of(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or ''}"
    except ValueError:
        return ""


class HostGate:
    def __init__(self, rate: float = 0.0) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next_slot: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def reserve(self, host: str) -> float:
        """Take the next slot for ``host``; returns the seconds to wait before using it."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._paused_until.get(host, 0.0))
            if self._interval:
                start = max(start, self._next_slot.get(host, 0.0))
                self._next_slot[host] = start + self._interval
            return start - now

    def pause(self, host: str, seconds: float) -> None:
        """Hold every request to ``host`` for ``seconds`` from now (429, Retry-After)."""
        with self._lock:
            until = time.monotonic() + seconds
            self._paused_until[host] = max(self._paused_until.get(host, 0.0), until)

    def paused_for(self, host: str) -> float:
        """Seconds left of ``host``'s pause (0 if none), taking no slot: what a retry
        waits at least (``retries.PoliteWait``)."""
        with self._lock:
            return max(0.0, self._paused_until.get(host, 0.0) - time.monotonic())

    def wait_sync(self, url: str) -> None:
        delay = self.reserve(host_of(url))
        if delay > 0:
            time.sleep(delay)

    async def wait_async(self, url: str) -> None:
        delay = self.reserve(host_of(url))
        if delay > 0:
            await asyncio.sleep(delay)
