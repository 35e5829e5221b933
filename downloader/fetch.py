"""Fetching: pure decisions about a response, one retry policy, two thin I/O shells.

``check_status``, ``check_declared_length``, ``check_length`` and ``check_body`` decide;
``fetch_sync`` (requests) and ``fetch_async`` (aiohttp) are the only two places in the
package that do HTTP. Both shells share the rest: one table turns either library's
exceptions into our failures (``failure_for``), one policy (``retries.retry_policy``)
drives tenacity's ``Retrying`` and ``AsyncRetrying`` over the attempts, and the client
factories (``new_session``, ``new_client``) read the proxies once (``proxy.Proxies``).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import FetchError, InvalidImageError, RetryableFetchError
from .magic import looks_like_image
from .politeness import HostGate
from .proxy import Proxies
from .robots import disallowed, parse_directives, user_agent
from .settings import HttpSettings

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


# ---------------------------------------------------------------------------- requests shell


def fetch_sync(
    session: requests.Session,
    url: str,
    http: HttpSettings,
    sleep: Callable[[float], None] = time.sleep,
    gate: HostGate | None = None,
) -> Fetched:
    """GET ``url`` with requests; after a failure, tenacity's ``Retrying`` runs the retries
    under ``retry_policy`` (``sleep`` waits between attempts). Raises ``FetchError``.

    The first attempt is made before tenacity is asked: most images need one, and
    tenacity's machinery costs more CPU than the rest of a fetch (benchmarks/README.md)."""
    try:
        return _polite_sync(session, url, http, gate)
    except FetchError as exc:
        first = exc
    from tenacity import Retrying  # only now: a run without a failure never loads it

    from .retries import retry_policy

    for attempt in Retrying(sleep=sleep, **retry_policy(http, gate, url)):
        with attempt:
            number = attempt.retry_state.attempt_number
            try:
                if number == 1:
                    raise first  # made above: tenacity decides on it like on any other
                return replace(_polite_sync(session, url, http, gate), attempts=number)
            except FetchError as exc:
                exc.attempts = number
                raise
    raise AssertionError("unreachable: tenacity raises the last failure")


def _polite_sync(
    session: requests.Session, url: str, http: HttpSettings, gate: HostGate | None
) -> Fetched:
    if gate is not None:
        gate.wait_sync(url)
    return _attempt_sync(session, url, http)


def _attempt_sync(session: requests.Session, url: str, http: HttpSettings) -> Fetched:
    from .deadline import request_deadline

    routes = _proxies_of.get(session)
    proxies = None if routes is None else routes.for_requests(url)

    deadline = time.monotonic() + http.timeout
    try:
        with (
            request_deadline(deadline),
            session.get(url, stream=True, timeout=http.timeout, proxies=proxies) as resp,
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


# ---------------------------------------------------------------------------- the clients

# The proxies each client was made with (``proxy.Proxies``): the environment is read when a
# client is made, and each request is handed its proxy. A client made elsewhere is not here.
_proxies_of: weakref.WeakKeyDictionary[object, Proxies] = weakref.WeakKeyDictionary()


def proxies_configured() -> bool:
    """Whether the environment names a proxy: ``HTTP_PROXY``, ``HTTPS_PROXY`` or
    ``ALL_PROXY`` (lowercase too). ``NO_PROXY`` alone names none, and costs nothing."""
    return Proxies.from_environment() is not None


def proxy_for(client: object, url: str) -> str | None:
    """The proxy a request to ``url`` through ``client`` (from ``new_session`` or
    ``new_client``) goes through, or None: direct."""
    proxies = _proxies_of.get(client)
    return None if proxies is None else proxies.for_url(url)


def _proxies(http: HttpSettings) -> Proxies | None:
    # block_private: never a proxy, the guard must see the address connected to.
    return None if http.block_private else Proxies.from_environment()


def new_session(http: HttpSettings) -> requests.Session:
    """A requests Session for one thread or process (its aiohttp twin: ``new_client``)."""
    import requests

    from .deadline import DeadlineAdapter
    from .netguard.sync import GuardedAdapter

    session = requests.Session()
    # The environment is read here, once: its proxies, and the CA bundle requests would take.
    session.trust_env = False
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    session.verify = bundle or True  # an empty variable is none, not "do not verify"
    if (proxies := _proxies(http)) is not None:
        _proxies_of[session] = proxies
    session.max_redirects = http.max_redirects
    session.headers["User-Agent"] = user_agent(http.user_agent, http.user_agent_token)
    # block_private: an adapter that checks every address it connects to.
    adapter_class = GuardedAdapter if http.block_private else DeadlineAdapter
    adapter = adapter_class(pool_connections=4, pool_maxsize=4, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def new_client(http: HttpSettings) -> aiohttp.ClientSession:
    """An aiohttp ClientSession for one event loop, its connector sized by ``http``."""
    import aiohttp

    from .netguard.aio import GuardedConnector

    if (proxies := _proxies(http)) is not None:
        proxies.check_aiohttp()
    # block_private: a connector that checks every address it connects to.
    connector = (GuardedConnector if http.block_private else aiohttp.TCPConnector)(
        limit=http.concurrency,
        limit_per_host=http.per_host or http.concurrency,
        ttl_dns_cache=300,
    )
    # trust_env stays off: the environment is read here, once.
    agent = user_agent(http.user_agent, http.user_agent_token)
    client = aiohttp.ClientSession(connector=connector, headers={"User-Agent": agent})
    if proxies is not None:
        _proxies_of[client] = proxies
    return client


# ---------------------------------------------------------------------------- aiohttp shell


async def fetch_async(
    session: aiohttp.ClientSession,
    url: str,
    http: HttpSettings,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    gate: HostGate | None = None,
) -> Fetched:
    """GET ``url`` with aiohttp; after a failure, tenacity's ``AsyncRetrying`` runs the
    retries under ``retry_policy`` (``sleep`` waits between attempts). Raises
    ``FetchError``. The first attempt is made before tenacity is asked, as in ``fetch_sync``."""
    try:
        return await _polite_async(session, url, http, gate)
    except FetchError as exc:
        first = exc
    from tenacity import AsyncRetrying

    from .retries import retry_policy

    async for attempt in AsyncRetrying(sleep=sleep, **retry_policy(http, gate, url)):
        with attempt:
            number = attempt.retry_state.attempt_number
            try:
                if number == 1:
                    raise first  # made above: tenacity decides on it like on any other
                return replace(await _polite_async(session, url, http, gate), attempts=number)
            except FetchError as exc:
                exc.attempts = number
                raise
    raise AssertionError("unreachable: tenacity raises the last failure")


async def _polite_async(
    session: aiohttp.ClientSession, url: str, http: HttpSettings, gate: HostGate | None
) -> Fetched:
    if gate is not None:
        await gate.wait_async(url)
    return await _attempt_async(session, url, http)


async def _attempt_async(session: aiohttp.ClientSession, url: str, http: HttpSettings) -> Fetched:
    try:
        async with session.get(
            url,
            timeout=_client_timeout(http.timeout),
            max_redirects=http.max_redirects,
            proxy=proxy_for(session, url),
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
