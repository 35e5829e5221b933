"""The retry policy both fetch shells give tenacity (``Retrying``, ``AsyncRetrying``): what
is retried (``RetryableFetchError``), how often (``http.retries``), how long to wait
(``PoliteWait``), and the pause a throttled host gets (``PauseHost``, on a ``HostGate``).
"""

from __future__ import annotations

import functools
from typing import Any

from tenacity import (
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .errors import RetryableFetchError
from .politeness import HostGate, host_of
from .settings import HttpSettings


class PoliteWait(wait_base):
    """tenacity's wait before the next attempt: exponential backoff with full jitter; a
    longer ``Retry-After`` wins (capped at ``max_backoff``); and no less than what is left
    of the host's pause, so that the shell's sleep, which a stop cuts short, waits it out
    rather than the gate."""

    def __init__(self, http: HttpSettings, gate: HostGate | None = None, host: str = "") -> None:
        self._backoff = _strategies(http)[2]
        self._cap = http.max_backoff
        self._gate, self._host = gate, host

    def __call__(self, state: RetryCallState) -> float:
        delay = float(self._backoff(state))
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), self._cap))
        if self._gate is not None:
            delay = max(delay, self._gate.paused_for(self._host))
        return delay


class PauseHost:
    """tenacity's hook after each failed attempt that may be retried (the last one too): a
    throttling answer pauses every request to the host, not just this one."""

    def __init__(self, http: HttpSettings, gate: HostGate, host: str) -> None:
        self._http, self._gate, self._host = http, gate, host

    def __call__(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableFetchError) and (pause := host_pause(exc, self._http)):
            self._gate.pause(self._host, pause)


def host_pause(exc: RetryableFetchError, http: HttpSettings) -> float | None:
    """How long a throttled host should be left alone by *every* request, or None.

    A 429, or any answer with ``Retry-After``, slows the whole host: without this, 63 other
    connections keep hammering a server that just asked us to back off.
    """
    if exc.retry_after is not None:
        return min(exc.retry_after, http.max_backoff)
    if exc.status == 429:
        return min(max(http.backoff, 1.0), http.max_backoff)
    return None


@functools.cache
def _strategies(http: HttpSettings) -> tuple[stop_base, retry_base, wait_base]:
    return (
        stop_after_attempt(http.retries + 1),
        retry_if_exception_type(RetryableFetchError),
        wait_random_exponential(multiplier=http.backoff, max=http.max_backoff),
    )


def retry_policy(http: HttpSettings, gate: HostGate | None = None, url: str = "") -> dict[str, Any]:
    """The one policy both shells give tenacity's ``Retrying``/``AsyncRetrying``: what to
    retry, how often, how long to wait, and the pause a throttled host gets from ``gate``.
    With ``reraise``, the last failure itself is raised, not tenacity's ``RetryError``."""
    stop, retry, _ = _strategies(http)
    host = host_of(url) if gate is not None else ""
    policy: dict[str, Any] = {
        "stop": stop,
        "retry": retry,
        "wait": PoliteWait(http, gate, host),
        "reraise": True,
    }
    if gate is not None:
        policy["after"] = PauseHost(http, gate, host)
    return policy
