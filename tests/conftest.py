"""Shared fixtures: the built-in server on a loopback port with hostile test routes, a
scrubbed environment, and the job service's test client. The helpers (not fixtures) are in
``tests/helpers``; test modules import them from there (``from helpers import jpeg``), never
from here."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import ImageServer, add_hostile_routes
from helpers.service import service_client

from downloader.server import RunningServer, make_app, server_thread
from downloader.settings import ServerSettings


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    app = make_app(ServerSettings(seed=7, pool_size=10))
    state = ImageServer(server=RunningServer("127.0.0.1", 0))
    add_hostile_routes(app, state)
    with server_thread(app) as running:
        state.server = running
        yield state


@pytest.fixture
def scrubbed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DOWNLOADER_* setting from the developer's shell reaches this test."""
    for name in list(os.environ):
        if name.startswith("DOWNLOADER_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """The job service's app over ``tmp_path/data``, through aiohttp's test client."""
    client = await service_client(tmp_path / "data")
    yield client
    await client.close()
