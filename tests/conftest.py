"""Shared fixtures: the built-in server on a loopback port with hostile test routes, and a
scrubbed environment. The helpers (not fixtures) are in ``tests/helpers``; test modules
import them from there (``from helpers import jpeg``), never from here."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import ImageServer, add_hostile_routes

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
