"""The stop token: the one way to stop a run, from a signal handler or any thread.

A run never has an exception raised into it to stop it. Whoever wants it to stop (the
Ctrl-C/SIGTERM handler, the Python API, the job service's cancel, a storage fault) sets
the token; each backend stops feeding jobs and cancels or drains what is in flight, and
the pipeline records what finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

SIGNAL = "signal"  # the reason a signal handler gives

Callback = Callable[[], None]


class StopToken:
    """Set once to stop a run: by a signal handler, the Python API, the service, a storage fault.

    Callbacks registered with ``on_set`` run in the thread that sets the token, which may
    be a signal handler interrupting the main thread anywhere: they must be quick and take
    no lock the interrupted code may hold (wake a loop, put on a ``SimpleQueue``, shut a
    socket), and leave the real work to the thread they wake.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        # Reentrant: a signal handler may set the token while the main thread holds it.
        self._lock = threading.RLock()
        self._reason: str | None = None
        self._callbacks: dict[int, Callback] = {}
        self._next = 0

    def set(self, reason: str | None = None) -> None:
        """Stop the run (thread-safe, idempotent; the first reason wins)."""
        with self._lock:
            if self._event.is_set():
                return
            self._reason = reason
            self._event.set()
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token is set or ``timeout`` passes; True if it is set."""
        return self._event.wait(timeout)

    @property
    def reason(self) -> str | None:
        return self._reason

    def on_set(self, callback: Callback) -> Callback:
        """Call ``callback`` when the token is set (at once if it already is).
        Returns a function that unregisters it."""
        with self._lock:
            key = self._next
            self._next += 1
            if not self._event.is_set():
                self._callbacks[key] = callback
                return lambda: self._forget(key)
        callback()
        return _nothing

    @contextlib.contextmanager
    def calling(self, callback: Callback) -> Iterator[None]:
        """``on_set(callback)`` for the duration of the block."""
        forget = self.on_set(callback)
        try:
            yield
        finally:
            forget()

    def _forget(self, key: int) -> None:
        with self._lock:
            self._callbacks.pop(key, None)


def _nothing() -> None:
    pass


@contextlib.contextmanager
def stopped_by_signals(token: StopToken) -> Iterator[None]:
    """Ctrl-C and SIGTERM set ``token``; a second one exits at once (130). Installed only
    in the main thread (Python runs signal handlers there alone); elsewhere the caller
    sets the token itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            os._exit(130)
        token.set(SIGNAL)

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
