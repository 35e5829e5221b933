"""The login's rate limit: ``MAX_WRONG`` wrong tokens within ``WINDOW_S`` from one address,
and that address's logins answer 429 until the oldest of them is out of the window.

Guessing a token over the login is then ~14,000 tries a day from one address, while a
person who mistypes is not held up. Kept in memory: a restart forgets, which only costs a
guesser what a minute costs.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

MAX_WRONG = 10
WINDOW_S = 60.0
MAX_ADDRESSES = 10_000  # addresses remembered at once; the least recent go first


class LoginLimit:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._wrong: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may log in again, or None when it may now."""
        times = self._recent(address)
        if len(times) < MAX_WRONG:
            return None
        return max(1, math.ceil(times[0] + WINDOW_S - self._clock()))

    def wrong(self, address: str) -> None:
        times = self._recent(address)
        times.append(self._clock())
        self._wrong[address] = self._wrong.pop(address, times)  # most recent last
        while len(self._wrong) > MAX_ADDRESSES:
            del self._wrong[next(iter(self._wrong))]

    def _recent(self, address: str) -> deque[float]:
        times = self._wrong.get(address, deque(maxlen=MAX_WRONG))
        while times and times[0] <= self._clock() - WINDOW_S:
            times.popleft()
        if not times:
            self._wrong.pop(address, None)
        return times
