"""Fault injection in the built-in server: each kind as clients see it, and its determinism."""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
import requests
from helpers import server_stats, wait_for
from PIL import Image

from downloader.config import load_settings
from downloader.errors import ConfigError
from downloader.server import (
    JPEG_MAGIC,
    RunningServer,
    choose_fault,
    make_app,
    server_thread,
)
from downloader.settings import FAULTS, ServerSettings

PATH = "/64/48?lock=3"
Serve = Callable[..., RunningServer]
TIMEOUT = 5.0
STALLED_CLIENT_TIMEOUT_S = 10.0  # the client that waits out a stall gives up then


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(**settings)`` starts a server with those ServerSettings; all stop at the end."""
    with contextlib.ExitStack() as stack:

        def start(**settings: Any) -> RunningServer:
            return stack.enter_context(server_thread(make_app(ServerSettings(**settings))))

        yield start


def normal_image(server: RunningServer, path: str = PATH) -> bytes:
    """The second request for a URL with a transient fault: the usual redirect and image."""
    resp = requests.get(server.base_url + path, timeout=TIMEOUT)
    assert resp.status_code == 200
    assert [r.status_code for r in resp.history] == [302]
    assert "/cache/resized/" in resp.url
    decodes(resp.content)
    return resp.content


def decodes(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


# ---------------------------------------------------------------------------- each kind


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [("fail", 503, "Service Unavailable"), ("throttle", 429, "Too Many Requests")],
)
def test_refusals_carry_retry_after(serve: Serve, kind: str, status: int, reason: str) -> None:
    server = serve(**{f"{kind}_rate": 1.0}, retry_after=7)
    resp = requests.get(server.base_url + PATH, timeout=TIMEOUT, allow_redirects=False)
    assert (resp.status_code, resp.reason) == (status, reason)
    assert resp.headers["Retry-After"] == "7"
    normal_image(server)
    counts = server_stats(server)
    assert counts[f"fault:{kind}"] == 1
    assert counts["entry"] == counts[PATH] == 2


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_dropped_body_is_an_error_for_requests(serve: Serve, kind: str) -> None:
    server = serve(**{f"{kind}_rate": 1.0})
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
        requests.get(server.base_url + PATH, timeout=TIMEOUT)
    normal_image(server)
    assert server_stats(server)[f"fault:{kind}"] == 1


@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_dropped_body_is_an_error_for_aiohttp(serve: Serve, kind: str) -> None:
    server = serve(**{f"{kind}_rate": 1.0})
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            async with session.get(server.base_url + PATH) as resp:
                assert resp.status == 200
                await resp.read()
        async with session.get(server.base_url + PATH) as resp:
            assert resp.status == 200 and resp.history[0].status == 302
            decodes(await resp.read())
    assert server_stats(server)[f"fault:{kind}"] == 1


def raw_get(server: RunningServer, path: str) -> tuple[dict[str, str], bytes]:
    """One GET over a bare socket, read to EOF: the headers and exactly the bytes sent."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200 ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return headers, body


def test_reset_and_truncate_send_the_photo(serve: Serve) -> None:
    """On the wire: half the photo the redirect serves, or all of it under a larger length."""
    for kind in ("reset", "truncate"):
        server = serve(**{f"{kind}_rate": 1.0})
        headers, body = raw_get(server, PATH)
        photo = normal_image(server)
        declared = int(headers["Content-Length"])
        assert headers["Content-Type"] == "image/jpeg"
        if kind == "reset":
            assert (declared, body) == (len(photo), photo[: len(photo) // 2])
        else:
            assert (declared, body) == (len(photo) + 1024, photo)


def test_slow_body_completes_late(serve: Serve) -> None:
    server = serve(slow_rate=1.0, slow_ms=300)
    started = time.monotonic()
    resp = requests.get(server.base_url + PATH, timeout=TIMEOUT)
    took = time.monotonic() - started
    assert resp.status_code == 200 and not resp.history  # answered directly, no redirect
    assert took >= 0.25  # the body was spread over slow_ms, not sent at once
    assert resp.content == normal_image(server)
    assert server_stats(server)["fault:slow"] == 1


def test_corrupt_is_persistent(serve: Serve) -> None:
    server = serve(corrupt_rate=1.0)
    bodies = []
    for _ in range(2):
        resp = requests.get(server.base_url + PATH, timeout=TIMEOUT)
        assert resp.status_code == 200 and not resp.history
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert resp.content.startswith(JPEG_MAGIC) and len(resp.content) > 100
        with pytest.raises(OSError):
            decodes(resp.content)
        bodies.append(resp.content)
    assert bodies[0] == bodies[1]
    assert server_stats(server)["fault:corrupt"] == 2


def test_stall_times_out_without_blocking_the_server(serve: Serve) -> None:
    server = serve(stall_rate=1.0)  # stall_s stays at 3600: only the client's timeout ends it
    url = server.base_url + PATH
    with ThreadPoolExecutor(1) as pool:
        # A margin no load reaches: the wait and the second request below must end first.
        stalled = pool.submit(requests.get, url, timeout=STALLED_CLIENT_TIMEOUT_S)
        wait_for(lambda: server_stats(server).get("fault:stall", 0) == 1)  # it is stalling now
        normal_image(server)  # same URL, second request: served while the first one stalls
        assert not stalled.done()
        with pytest.raises(requests.exceptions.ReadTimeout):
            stalled.result()
    wait_for(lambda: server_stats(server).get("stall:abandoned", 0) == 1)  # the handler noticed
    assert server_stats(server)["fault:stall"] == 1


async def test_stall_times_out_for_aiohttp(serve: Serve) -> None:
    server = serve(stall_rate=1.0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with session.get(
                server.base_url + PATH, timeout=aiohttp.ClientTimeout(total=0.3)
            ) as resp:
                await resp.read()
        async with session.get(server.base_url + PATH) as resp:
            assert resp.status == 200
            decodes(await resp.read())


def test_stall_ends_when_the_server_stops() -> None:
    ctx = server_thread(make_app(ServerSettings(stall_rate=1.0)))
    server = ctx.__enter__()
    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(requests.get, server.base_url + PATH, timeout=TIMEOUT)
        wait_for(lambda: server_stats(server).get("fault:stall", 0) == 1)  # it is stalling now
        ctx.__exit__(None, None, None)  # returns (pytest-timeout would end a hang)...
        assert stalled.result().status_code == 503  # ...and answers the stalled client


def test_stall_ends_after_stall_s_with_the_normal_answer(serve: Serve) -> None:
    server = serve(stall_rate=1.0, stall_s=0.2)
    started = time.monotonic()
    resp = requests.get(server.base_url + PATH, timeout=TIMEOUT)
    assert resp.status_code == 200 and time.monotonic() - started >= 0.2
    decodes(resp.content)


def test_latency_still_applies(serve: Serve) -> None:
    server = serve(fail_rate=1.0, latency_ms=200)
    started = time.monotonic()
    resp = requests.get(server.base_url + PATH, timeout=TIMEOUT, allow_redirects=False)
    assert resp.status_code == 503 and time.monotonic() - started >= 0.2


def test_no_faults_by_default(serve: Serve) -> None:
    server = serve()
    normal_image(server)
    assert not any(key.startswith(("fault:", "stall:")) for key in server_stats(server))


# ---------------------------------------------------------------------------- determinism

MIXED: dict[str, Any] = {
    "fail_rate": 0.15,
    "throttle_rate": 0.1,
    "reset_rate": 0.1,
    "truncate_rate": 0.1,
    "stall_rate": 0.05,
    "slow_rate": 0.05,
    "corrupt_rate": 0.1,
}


def outcome(url: str) -> str:
    """What a client sees of one first request, in a word."""
    try:
        resp = requests.get(url, timeout=TIMEOUT)
    except requests.exceptions.ChunkedEncodingError:
        return "dropped"
    if resp.status_code != 200:
        return str(resp.status_code)
    return "redirect" if resp.history else "direct"


def test_same_seed_same_faults_over_http(serve: Serve) -> None:
    rates: dict[str, Any] = {k: v for k, v in MIXED.items() if k not in ("stall_rate", "slow_rate")}
    paths = [f"/32/24?lock={i}" for i in range(40)]
    seen = []
    for _ in range(2):
        server = serve(seed=11, **rates)
        seen.append([outcome(server.base_url + path) for path in paths])
    assert seen[0] == seen[1]
    assert len(set(seen[0])) >= 4  # a mix, not one outcome everywhere
    config = ServerSettings(seed=11, **rates)
    expected: dict[str | None, str] = {
        "fail": "503",
        "throttle": "429",
        "reset": "dropped",
        "truncate": "dropped",
        "corrupt": "direct",
        None: "redirect",
    }
    assert seen[0] == [expected[choose_fault(config, path)] for path in paths]


def test_pattern_depends_on_seed_and_url_only() -> None:
    paths = [f"/320/240/cats?lock={i}" for i in range(200)]
    pattern = [choose_fault(ServerSettings(seed=1, **MIXED), p) for p in paths]
    assert pattern == [choose_fault(ServerSettings(seed=1, **MIXED), p) for p in paths]
    assert pattern != [choose_fault(ServerSettings(seed=2, **MIXED), p) for p in paths]
    assert set(pattern) == {*FAULTS, None}


def test_observed_rate_matches() -> None:
    config = ServerSettings(seed=5, fail_rate=0.1)
    faults = Counter(choose_fault(config, f"/320/240?lock={i}") for i in range(1000))
    assert set(faults) == {"fail", None}
    assert 0.05 <= faults["fail"] / 1000 <= 0.15

    tenth: dict[str, Any] = {f"{kind}_rate": 0.1 for kind in FAULTS}
    mixed = ServerSettings(seed=5, **tenth)
    faults = Counter(choose_fault(mixed, f"/g/100/100?lock={i}") for i in range(1000))
    for kind in FAULTS:
        assert 0.05 <= faults[kind] / 1000 <= 0.15, kind
    assert 0.2 <= faults[None] / 1000 <= 0.4


def test_rate_one_always_faults() -> None:
    config = ServerSettings(corrupt_rate=1.0)
    assert {choose_fault(config, f"/1/1?lock={i}") for i in range(200)} == {"corrupt"}


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fail_rate": -0.1}, "server.fail_rate must be between 0 and 1"),
        ({"corrupt_rate": 1.5}, "server.corrupt_rate must be between 0 and 1"),
        ({"slow_rate": float("nan")}, "server.slow_rate must be between 0 and 1"),
        ({"fail_rate": 0.6, "reset_rate": 0.6}, "must add up to at most 1"),
        ({"retry_after": -1}, "server.retry_after"),
        ({"stall_s": -1.0}, "server.stall_s"),
        ({"slow_ms": -1.0}, "server.slow_ms"),
    ],
)
def test_rates_are_validated(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        ServerSettings(**changes)
    assert "\n" not in str(info.value)


def test_rates_adding_up_to_one_are_fine() -> None:
    ServerSettings(fail_rate=0.1, throttle_rate=0.2, reset_rate=0.7)
    sevenths: dict[str, Any] = {f"{kind}_rate": 1 / 7 for kind in FAULTS}
    ServerSettings(**sevenths)


def test_fault_keys_load_from_the_environment() -> None:
    settings = load_settings(
        environ={"DOWNLOADER_SERVER_FAIL_RATE": "0.25", "DOWNLOADER_SERVER_RETRY_AFTER": "3"}
    )
    assert (settings.server.fail_rate, settings.server.retry_after) == (0.25, 3)
    assert settings.server.stall_s == 3600.0 and settings.server.slow_ms == 1000.0
    with pytest.raises(ConfigError, match="add up to at most 1"):
        load_settings(
            environ={"DOWNLOADER_SERVER_FAIL_RATE": "0.7", "DOWNLOADER_SERVER_STALL_RATE": "0.7"}
        )
