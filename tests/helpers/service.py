"""The job service in this process, through aiohttp's test client, and polling it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from downloader.config import load_settings
from downloader.service.app import make_app
from downloader.settings import Settings

SMALL = {"local": True, "thumbnails": {"size": 32}, "http": {"concurrency": 4}}  # a quick job


def service_settings(data: Path, **service: Any) -> Settings:
    """The settings of a service over the data folder ``data``, with ``service.*`` set."""
    overrides = {"service.data": data, **{f"service.{k}": v for k, v in service.items()}}
    return load_settings(environ={}, overrides=overrides)


async def service_client(data: Path, **service: Any) -> TestClient[Any, Any]:
    """A started test client of the service's app (see ``service_settings``); close it."""
    client: TestClient[Any, Any] = TestClient(
        TestServer(make_app(service_settings(data, **service)))
    )
    await client.start_server()
    return client


async def submit(client: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    """Submit a SMALL job with ``body`` on top; it must be accepted (201)."""
    response = await client.post("/api/v1/jobs", json={**SMALL, **body})
    assert response.status == 201, await response.text()
    job: dict[str, Any] = await response.json()
    return job


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 60) -> Any:
    """Await ``check`` until it returns something true, and return that; fail after
    ``timeout`` seconds (a deadline, never reached when things work)."""
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return value
