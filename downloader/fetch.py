"""Fetching: pure decisions about a response, one retry policy, two thin I/O shells.

``check_status``, ``check_declared_length``, ``check_length`` and ``check_body`` decide;
``fetch_sync`` (requests) and ``fetch_async`` (aiohttp) are the only two places in the
package that do HTTP. Both shells share the rest: one table turns either library's
exceptions into our failures (``failure_for``), and one driver (``_Tries``) counts the
attempts and asks the tenacity policy (``retry_policy``) whether and when to try again.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import FetchError, InvalidImageError, RetryableFetchError
from .magic import looks_like_image
from .politeness import HostGate, host_of
from .robots import disallowed, parse_directives, user_agent
from .settings import HttpSettings

if TYPE_CHECKING:
    import aiohttp
    import requests
    from tenacity import RetryCallState, Retrying

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


def check_opt_out(values: Iterable[str], http: HttpSettings, url: str) -> None:
    """Refuse an image whose ``X-Robots-Tag`` opts it out (``robots.disallowed``)."""
    if not values:
        return
    banned = parse_directives(http.disallowed_header_directives)
    hit = disallowed(values, banned, http.user_agent_token)
    if hit:
        raise FetchError(f"X-Robots-Tag {hit}: the site opts this image out: {url}")


def check_declared_length(value: str | None, max_bytes: int) -> int | None:
    """The declared Content-Length, refusing it early when it is over the cap."""
    if value is None or not _is_number(value.strip()):
        return None
    length = int(value)
    if length > max_bytes:
        raise InvalidImageError(f"body of {length} bytes is over the {max_bytes}-byte cap")
    return length


def check_length(declared: int | None, data: bytes, url: str) -> None:
    """The body is as long as its Content-Length said: a shorter one was cut off on the
    way (worth another try), and a longer one is not the body that was described."""
    if declared is not None and len(data) != declared:
        raise RetryableFetchError(
            f"body of {len(data)} bytes, but Content-Length said {declared}: {url}"
        )


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


# ---------------------------------------------------------------------------- failures

# Our failures, and for each the exceptions of requests and of aiohttp that mean it; the
# first row that matches wins (a connect timeout is both a timeout and a connection error).
_FAILURES = ("redirects", "timeout", "connection", "request", "url")


@functools.cache
def _library_errors(library: str) -> tuple[tuple[str, tuple[type[BaseException], ...]], ...]:
    if library == "requests":
        import requests

        columns: tuple[tuple[type[BaseException], ...], ...] = (
            (requests.TooManyRedirects,),
            (requests.Timeout,),
            (requests.ConnectionError, requests.exceptions.ChunkedEncodingError),
            (requests.RequestException,),
            (ValueError,),  # urllib3's LocationParseError, idna: a URL no client can use
        )
    else:
        import aiohttp

        columns = (
            (aiohttp.TooManyRedirects,),
            (TimeoutError,),
            (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError),
            (aiohttp.ClientError,),
            (ValueError,),  # UnicodeError from idna, bad ports: a URL no client can use
        )
    return tuple(zip(_FAILURES, columns, strict=True))


def failure_for(
    library: str, exc: BaseException, url: str, http: HttpSettings, late: bool = False
) -> FetchError | None:
    """The failure a ``library`` ("requests" or "aiohttp") exception means, or None when it
    is none of ours (a bug: let it raise). ``late``: the request's deadline had passed, so
    a dropped connection is the watchdog cutting a trickling server short."""
    kind = next((k for k, types in _library_errors(library) if isinstance(exc, types)), None)
    if kind == "connection" and late:
        kind = "timeout"
    if kind == "redirects":
        return FetchError(f"too many redirects (over {http.max_redirects}): {url}")
    if kind == "timeout":
        return RetryableFetchError(f"timed out after {http.timeout:g} s: {url}")
    if kind == "connection":
        return RetryableFetchError(f"connection failed: {_reason(exc)}: {url}")
    if kind == "request":
        return FetchError(f"request failed: {_reason(exc)}: {url}")
    if kind == "url":
        return FetchError(f"invalid URL: {_reason(exc)}: {url}")
    return None


# ---------------------------------------------------------------------------- retry policy


class _Wait:
    """Exponential backoff with full jitter; a longer ``Retry-After`` wins (capped)."""

    def __init__(self, http: HttpSettings) -> None:
        from tenacity import wait_random_exponential

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
    """The one policy both shells use: what to retry, how often, how long to wait.
    (tenacity is imported when a first attempt fails: most runs never need it.)"""
    from tenacity import retry_if_exception_type, stop_after_attempt

    return {
        "stop": stop_after_attempt(http.retries + 1),
        "wait": _Wait(http),
        "retry": retry_if_exception_type(RetryableFetchError),
    }


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


class _Tries:
    """The retry driver both shells run: it counts one URL's attempts and, after each
    failure, pauses a throttling host and asks the policy whether and how long to wait.

    The policy is consulted only after a failure: most images need one attempt, and
    tenacity's per-call machinery cost more CPU than the rest of our fetch code."""

    def __init__(self, url: str, http: HttpSettings, gate: HostGate | None) -> None:
        self.url, self.http, self.gate = url, http, gate
        self.count = 0
        self._policy: Retrying | None = None

    def start(self) -> None:
        self.count += 1

    def done(self, fetched: Fetched) -> Fetched:
        return fetched if self.count == 1 else replace(fetched, attempts=self.count)

    def wait_after(self, exc: FetchError) -> float:
        """Seconds to wait before the next attempt; raises ``exc`` when there is none."""
        exc.attempts = self.count
        if isinstance(exc, RetryableFetchError) and self.gate is not None:
            pause = host_pause(exc, self.http)
            if pause:  # a throttling answer pauses every request to the host
                self.gate.pause(host_of(self.url), pause)
        from tenacity import RetryCallState, Retrying

        policy = self._policy = self._policy or Retrying(**retry_policy(self.http))
        state = RetryCallState(policy, None, (), {})
        state.attempt_number = self.count
        state.set_exception((type(exc), exc, exc.__traceback__))
        if not policy.retry(state) or policy.stop(state):
            raise exc
        return float(policy.wait(state))


# ---------------------------------------------------------------------------- requests shell


def fetch_sync(
    session: requests.Session,
    url: str,
    http: HttpSettings,
    sleep: Callable[[float], None] = time.sleep,
    gate: HostGate | None = None,
) -> Fetched:
    """GET ``url`` with requests under the retry policy. Raises ``FetchError``."""
    tries = _Tries(url, http, gate)
    while True:
        tries.start()
        if gate is not None:
            gate.wait_sync(url)
        try:
            return tries.done(_attempt_sync(session, url, http))
        except FetchError as exc:
            sleep(tries.wait_after(exc))


def _attempt_sync(session: requests.Session, url: str, http: HttpSettings) -> Fetched:
    from .deadline import request_deadline

    deadline = time.monotonic() + http.timeout
    try:
        with (
            request_deadline(deadline),
            session.get(url, stream=True, timeout=http.timeout) as resp,
        ):
            check_status(resp.status_code, resp.headers, url)
            check_opt_out(resp.raw.headers.getlist("X-Robots-Tag"), http, url)
            declared = check_declared_length(resp.headers.get("Content-Length"), http.max_bytes)
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
            if not resp.headers.get("Content-Encoding"):
                check_length(declared, data, url)
            content_type = resp.headers.get("Content-Type", "")
            check_body(content_type, data)
            return Fetched(url, resp.url, data, content_type)
    except FetchError:
        raise
    except Exception as exc:
        failure = failure_for("requests", exc, url, http, time.monotonic() >= deadline)
        if failure is None:
            raise
        raise failure from None


def proxies_configured() -> bool:
    """Whether the environment names a proxy. Without one, the clients need not look: with
    ``trust_env`` requests re-reads every proxy variable on each request, a sizeable share
    of a small image's CPU (figure in benchmarks/README.md)."""
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
    session.headers["User-Agent"] = user_agent(http.user_agent, http.user_agent_token)
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
    tries = _Tries(url, http, gate)
    while True:
        tries.start()
        if gate is not None:
            await gate.wait_async(url)
        try:
            return tries.done(await _attempt_async(session, url, http))
        except FetchError as exc:
            await sleep(tries.wait_after(exc))


async def _attempt_async(session: aiohttp.ClientSession, url: str, http: HttpSettings) -> Fetched:
    try:
        async with session.get(
            url, timeout=_client_timeout(http.timeout), max_redirects=http.max_redirects
        ) as resp:
            check_status(resp.status, resp.headers, url)
            check_opt_out(resp.headers.getall("X-Robots-Tag", ()), http, url)
            declared = check_declared_length(resp.headers.get("Content-Length"), http.max_bytes)
            if declared is not None and not resp.headers.get("Content-Encoding"):
                data = await resp.read()  # aiohttp stops at the declared length
                check_length(declared, data, url)
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
    except FetchError:
        raise
    except Exception as exc:
        failure = failure_for("aiohttp", exc, url, http)
        if failure is None:
            raise
        raise failure from None


@functools.cache
def _client_timeout(total: float) -> aiohttp.ClientTimeout:
    import aiohttp

    return aiohttp.ClientTimeout(total=total)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
