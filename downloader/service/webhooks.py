"""Webhooks: an ended job's JSON, POSTed to the address its body named.

A delivery is kept in the store (``deliveries``: address, payload, when to give up) from
the job's end until it is delivered or given up, so a service killed mid-retry tries again
as it starts. Attempts follow tenacity's jittered exponential backoff until
``service.webhook_retry_s`` after the job's end; no answer, a timeout, 429 and 5xx are
tried again, any other answer is final. With ``service.webhook_secret``, the request is
signed: ``X-Downloader-Signature: sha256=<hex HMAC-SHA256 of the body>`` (the receiver
checks the body it got came from this service; the token is never sent).

The address follows the job's rule: unless the service allows private addresses, it must
be public, at submit (``check_url``) and on the address connected to (``GuardedConnector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity import wait_random_exponential as backoff

from .. import __version__
from ..errors import ConfigError
from ..jobs import check_url as url_problem
from ..netguard import AddressRefusedError, allowed, refuse_literal
from ..netguard.aio import GuardedConnector
from ..settings import ServiceSettings
from .store import JobRow, Store, now
from .views import job_json

log = logging.getLogger("downloader.service")

SIGNATURE = "X-Downloader-Signature"
ATTEMPT_TIMEOUT_S = 10.0
MAX_URL = 2000


class _Problem(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _TryAgain(_Problem):
    """An attempt that may succeed later: no answer, a timeout, 429 or 5xx."""


class _Final(_Problem):
    """An answer that will not change by asking again (a 4xx, a refused address)."""


@dataclass(frozen=True)
class Delivery:
    job_id: str
    url: str
    payload: str
    give_up_at: float  # time.time()


PUBLIC_ONLY = "a webhook reaches only public addresses unless the service runs with --allow-private"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def check_url(url: Any, allow_private: bool) -> str:
    """A job's ``webhook`` as given, or a ``ConfigError`` (the API's 400) saying why not."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise ConfigError(f"webhook must be an http(s) URL of at most {MAX_URL} characters")
    problem = url_problem(url)  # the door an image's URL goes through
    if problem:
        raise ConfigError(f"webhook: {problem}")
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port
    if allow_private:
        return url
    try:
        refuse_literal(host, why=PUBLIC_ONLY)
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port or 80, type=socket.SOCK_STREAM
        )
        allowed(host, infos, lambda info: str(info[4][0]), why=PUBLIC_ONLY)
    except AddressRefusedError as exc:
        raise ConfigError(f"webhook {exc}") from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"webhook: cannot resolve {host}: {exc}") from None
    return url


class Webhooks:
    """The deliveries in flight, one task each."""

    def __init__(self, store: Store, config: ServiceSettings) -> None:
        self._store = store
        self._config = config
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        connector = aiohttp.TCPConnector() if self._config.allow_private else GuardedConnector()
        self._session = aiohttp.ClientSession(connector=connector)
        for delivery in _pending(self._store):
            self._spawn(delivery)
        for row in _unrecorded(self._store):  # ended just before a kill -9
            self.ended(row)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def ended(self, row: JobRow) -> None:
        """The job ended: its delivery is kept, then tried."""
        if row.webhook is None:
            return
        delivery = Delivery(
            row.id, row.webhook, job_json(row), time.time() + self._config.webhook_retry_s
        )
        self._store.db.execute(
            "INSERT OR REPLACE INTO deliveries (job_id, url, payload, give_up_at) "
            "VALUES (?, ?, ?, ?)",
            (delivery.job_id, delivery.url, delivery.payload, delivery.give_up_at),
        )
        self._record(row.id, "pending", 0, None, None)
        self._spawn(delivery)

    def _spawn(self, delivery: Delivery) -> None:
        old = self._tasks.pop(delivery.job_id, None)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._deliver(delivery))
        self._tasks[delivery.job_id] = task
        task.add_done_callback(lambda t: self._forget(delivery.job_id, t))

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]

    async def _deliver(self, delivery: Delivery) -> None:
        attempts, status, error = 0, None, None

        def give_up(state: RetryCallState) -> bool:
            return time.time() >= delivery.give_up_at

        try:
            async for attempt in AsyncRetrying(
                stop=give_up, wait=backoff(multiplier=0.5, max=30),
                retry=retry_if_exception_type(_TryAgain), reraise=True,
            ):  # fmt: skip
                with attempt:
                    attempts += 1
                    status = await self._attempt(delivery, attempts)
            outcome = "delivered"
        except _Problem as exc:
            outcome, status, error = "failed", exc.status, str(exc)
        self._record(delivery.job_id, outcome, attempts, status, error)
        self._store.db.execute("DELETE FROM deliveries WHERE job_id = ?", (delivery.job_id,))
        log.info("job %s: webhook %s (%d attempts)", delivery.job_id, outcome, attempts)

    async def _attempt(self, delivery: Delivery, number: int) -> int:
        """One POST; a failed one is recorded (the job's JSON shows the retries)."""
        try:
            return await self._post(delivery)
        except _Problem as exc:
            self._record(delivery.job_id, "pending", number, exc.status, str(exc))
            raise

    async def _post(self, delivery: Delivery) -> int:
        assert self._session is not None
        body = delivery.payload.encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"downloader/{__version__}"}
        if self._config.webhook_secret:
            headers[SIGNATURE] = signature(self._config.webhook_secret, body)
        try:
            async with self._session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S),
            ) as response:  # fmt: skip
                status = response.status
        except AddressRefusedError as exc:
            raise _Final(str(exc)) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _TryAgain(f"no answer: {exc or type(exc).__name__}") from None
        if 200 <= status < 300:
            return status
        problem = _Final if status < 500 and status != 429 else _TryAgain
        raise problem(f"the receiver answered HTTP {status}", status)

    def _record(
        self, job_id: str, state: str, attempts: int, status: int | None, error: str | None
    ) -> None:
        report = {"state": state, "attempts": attempts, "status": status, "error": error,
                  "at": now()}  # fmt: skip
        self._store.set_fields(job_id, delivery=json.dumps(report, separators=(",", ":")))


def _pending(store: Store) -> list[Delivery]:
    rows = store.db.execute("SELECT job_id, url, payload, give_up_at FROM deliveries").fetchall()
    return [Delivery(*row) for row in rows]


def _unrecorded(store: Store) -> list[JobRow]:
    ids = store.db.execute(
        "SELECT id FROM jobs WHERE webhook IS NOT NULL AND delivery IS NULL "
        "AND state IN ('done', 'failed', 'cancelled')"
    ).fetchall()
    return [row for (job_id,) in ids if (row := store.get(job_id)) is not None]
