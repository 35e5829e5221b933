"""Fetching: pure decisions about a response, one retry policy, two thin I/O shells.

``check_status``, ``check_declared_length`` and ``check_body`` decide; ``fetch_sync``
(requests) and ``fetch_async`` (aiohttp) are the only two places in the package that do
HTTP, and both run their single attempt under the same tenacity policy (``retry_policy``).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .errors import FetchError, InvalidImageError, RetryableFetchError
from .politeness import HostGate, host_of
from .settings import HttpSettings
from .thumbnails import looks_like_image

if TYPE_CHECKING:
    import aiohttp
    import requests

CHUNK = 256 * 1024  # large reads: fewer syscalls and Python-level loop turns per image


@dataclass(frozen=True)
class Fetched:
    url: str
    final_url: str
    data: bytes
    content_type: str
    attempts: int = 1


# ---------------------------------------------------------------------------- decisions


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 10.2.3): delta or HTTP date."""
    if not value:
        return None
    value = value.strip()
    if _is_number(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _is_number(text: str) -> bool:
    """ASCII digits only, and short: ``"²".isdigit()`` is true but ``int("²")`` fails, and
    a 5000-digit header would trip Python's int-parsing limit."""
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


def check_status(status: int, headers: Mapping[str, str], url: str) -> None:
    """200 passes; 429 and 5xx are worth retrying; everything else is final."""
    if status == 200:
        return
    if status == 429 or 500 <= status <= 599:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        raise RetryableFetchError(f"HTTP {status} from {url}", retry_after, status)
    raise FetchError(f"HTTP {status} from {url}")


def check_declared_length(value: str | None, max_bytes: int) -> int | None:
    """The declared Content-Length, refusing it early when it is over the cap."""
    if value is None or not _is_number(value.strip()):
        return None
    length = int(value)
    if length > max_bytes:
        raise InvalidImageError(f"body of {length} bytes is over the {max_bytes}-byte cap")
    return length


def too_big(max_bytes: int) -> InvalidImageError:
    return InvalidImageError(f"body is over the {max_bytes}-byte cap")


def check_body(content_type: str, data: bytes) -> None:
    """An image content type, or image magic bytes when the server mislabels it."""
    if not data:
        raise InvalidImageError("empty body")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind.startswith("image/") or looks_like_image(data):
        return
    raise InvalidImageError(f"not an image: content type {kind or 'missing'!r}")


# ---------------------------------------------------------------------------- retry policy


class _Wait:
    """Exponential backoff with full jitter; a longer ``Retry-After`` wins (capped)."""

    def __init__(self, http: HttpSettings) -> None:
        self._backoff = wait_random_exponential(multiplier=http.backoff, max=http.max_backoff)
        self._cap = http.max_backoff

    def __call__(self, state: RetryCallState) -> float:
        delay = float(self._backoff(state))
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), self._cap))
        return delay


def retry_policy(http: HttpSettings) -> dict[str, Any]:
    """The one policy both shells use: what to retry, how often, how long to wait."""
    return {
        "stop": stop_after_attempt(http.retries + 1),
        "wait": _Wait(http),
        "retry": retry_if_exception_type(RetryableFetchError),
        "reraise": True,
    }


def _failed(exc: FetchError, attempts: int) -> FetchError:
    exc.attempts = attempts
    return exc


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


def _slow_host(
    gate: HostGate | None, url: str, exc: RetryableFetchError, http: HttpSettings
) -> None:
    """Both shells: a throttling answer pauses every request to its host."""
    pause = host_pause(exc, http) if gate is not None else None
    if gate is not None and pause:
        gate.pause(host_of(url), pause)


# ---------------------------------------------------------------------------- requests shell


def fetch_sync(
    session: requests.Session,
    url: str,
    http: HttpSettings,
    sleep: Callable[[float], None] = time.sleep,
    gate: HostGate | None = None,
) -> Fetched:
    """GET ``url`` with requests under the retry policy. Raises ``FetchError``."""
    attempts = 0

    def attempt() -> Fetched:
        nonlocal attempts
        attempts += 1
        if gate is not None:
            gate.wait_sync(url)
        try:
            return _attempt_sync(session, url, http)
        except RetryableFetchError as exc:
            _slow_host(gate, url, exc, http)
            raise

    try:
        try:
            fetched = attempt()  # most images need one attempt: see _replay
        except RetryableFetchError as first:
            retrying = Retrying(sleep=sleep, **retry_policy(http))
            fetched = retrying(_replay(first, attempt))
    except FetchError as exc:
        raise _failed(exc, attempts) from None
    return replace(fetched, attempts=attempts)


def _replay(first: RetryableFetchError, attempt: Callable[[], Fetched]) -> Callable[[], Fetched]:
    """``attempt``, whose first call re-raises ``first`` instead of running.

    The first attempt runs outside tenacity: its machinery costs ~0.1 ms of CPU an image,
    more than the rest of our fetch code, and most images need one attempt. When it fails
    with a retryable error, the policy takes over and is handed that failure as its own
    attempt 1, so its waits (Retry-After included) and its attempt count stay the policy's.
    """
    pending = [first]

    def call() -> Fetched:
        if pending:
            raise pending.pop()
        return attempt()

    return call


def _replay_async(
    first: RetryableFetchError, attempt: Callable[[], Awaitable[Fetched]]
) -> Callable[[], Awaitable[Fetched]]:
    """``_replay`` for a coroutine function: tenacity awaits only what is one."""
    pending = [first]

    async def call() -> Fetched:
        if pending:
            raise pending.pop()
        return await attempt()

    return call


def _attempt_sync(session: requests.Session, url: str, http: HttpSettings) -> Fetched:
    import requests

    from .deadline import request_deadline

    deadline = time.monotonic() + http.timeout
    try:
        with (
            request_deadline(deadline),
            session.get(url, stream=True, timeout=http.timeout) as resp,
        ):
            check_status(resp.status_code, resp.headers, url)
            check_declared_length(resp.headers.get("Content-Length"), http.max_bytes)
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_content(CHUNK):
                size += len(chunk)
                if size > http.max_bytes:
                    raise too_big(http.max_bytes)
                if time.monotonic() > deadline:
                    raise RetryableFetchError(f"timed out after {http.timeout:g} s: {url}")
                chunks.append(chunk)
            if time.monotonic() > deadline:  # cut short by the watchdog at an EOF
                raise RetryableFetchError(f"timed out after {http.timeout:g} s: {url}")
            data = b"".join(chunks)
            content_type = resp.headers.get("Content-Type", "")
            check_body(content_type, data)
            return Fetched(url, resp.url, data, content_type)
    except requests.TooManyRedirects:
        raise FetchError(f"too many redirects (over {http.max_redirects}): {url}") from None
    except requests.Timeout:
        raise RetryableFetchError(f"timed out after {http.timeout:g} s: {url}") from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
        if time.monotonic() >= deadline:  # the watchdog cut a trickling server short
            raise RetryableFetchError(f"timed out after {http.timeout:g} s: {url}") from None
        raise RetryableFetchError(f"connection failed: {_reason(exc)}: {url}") from None
    except requests.RequestException as exc:
        raise FetchError(f"request failed: {_reason(exc)}: {url}") from None
    except ValueError as exc:  # urllib3's LocationParseError, idna: a URL no client can use
        raise FetchError(f"invalid URL: {_reason(exc)}: {url}") from None


def proxies_configured() -> bool:
    """Whether the environment names a proxy. Without one, the clients need not look: with
    ``trust_env`` requests re-reads every proxy variable on each request (measured: ~1 ms
    per request, a fifth of a small image's CPU)."""
    return any(name.lower().endswith("_proxy") for name in os.environ)


def new_session(http: HttpSettings) -> requests.Session:
    """A requests Session sized for one thread or process."""
    import requests

    from .deadline import DeadlineAdapter
    from .netguard.sync import GuardedAdapter

    session = requests.Session()
    # block_private: an adapter that checks every address it connects to (and no proxy:
    # the check must see the address connected to).
    session.trust_env = proxies_configured() and not http.block_private
    session.max_redirects = http.max_redirects
    session.headers["User-Agent"] = http.user_agent
    adapter_class = GuardedAdapter if http.block_private else DeadlineAdapter
    adapter = adapter_class(pool_connections=4, pool_maxsize=4, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ---------------------------------------------------------------------------- aiohttp shell


async def fetch_async(
    session: aiohttp.ClientSession,
    url: str,
    http: HttpSettings,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    gate: HostGate | None = None,
) -> Fetched:
    """GET ``url`` with aiohttp under the retry policy. Raises ``FetchError``."""
    attempts = 0

    async def attempt() -> Fetched:
        nonlocal attempts
        attempts += 1
        if gate is not None:
            await gate.wait_async(url)
        try:
            return await _attempt_async(session, url, http)
        except RetryableFetchError as exc:
            _slow_host(gate, url, exc, http)
            raise

    try:
        try:
            fetched = await attempt()  # most images need one attempt: see _replay
        except RetryableFetchError as first:
            retrying = AsyncRetrying(sleep=sleep, **retry_policy(http))
            fetched = await retrying(_replay_async(first, attempt))
    except FetchError as exc:
        raise _failed(exc, attempts) from None
    return replace(fetched, attempts=attempts)


async def _attempt_async(session: aiohttp.ClientSession, url: str, http: HttpSettings) -> Fetched:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=http.timeout)
    try:
        async with session.get(url, timeout=timeout, max_redirects=http.max_redirects) as resp:
            check_status(resp.status, resp.headers, url)
            declared = check_declared_length(resp.headers.get("Content-Length"), http.max_bytes)
            if declared is not None and not resp.headers.get("Content-Encoding"):
                data = await resp.read()  # aiohttp stops at the declared length
            else:
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    buf += chunk
                    if len(buf) > http.max_bytes:
                        raise too_big(http.max_bytes)
                data = bytes(buf)
            content_type = resp.headers.get("Content-Type", "")
            check_body(content_type, data)
            return Fetched(url, str(resp.url), data, content_type)
    except aiohttp.TooManyRedirects:
        raise FetchError(f"too many redirects (over {http.max_redirects}): {url}") from None
    except TimeoutError:
        raise RetryableFetchError(f"timed out after {http.timeout:g} s: {url}") from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise RetryableFetchError(f"connection failed: {_reason(exc)}: {url}") from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"request failed: {_reason(exc)}: {url}") from None
    except ValueError as exc:  # UnicodeError from idna, bad ports: a URL no client can use
        raise FetchError(f"invalid URL: {_reason(exc)}: {url}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
