"""``http.block_private``: the address policy, both HTTP shells with an injected resolver
(no internet: names are made up and point where each test says), and every backend
against the built-in server, which listens on loopback and so must never be reached."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from helpers import CONTRACT_BACKENDS, make_settings, server_stats

from downloader import netguard
from downloader.config import load_settings
from downloader.deadline import DeadlineAdapter
from downloader.errors import FetchError, RetryableFetchError
from downloader.fetch import (
    Fetched,
    fetch_async,
    fetch_sync,
    new_client,
    new_session,
    proxy_for,
)
from downloader.netguard import AddressRefusedError, IPAddress, allowed, check_address
from downloader.netguard.aio import GuardedConnector, GuardedResolver
from downloader.netguard.sync import GuardedAdapter
from downloader.pipeline import run
from downloader.server import make_app, render_photo, server_thread
from downloader.settings import HttpSettings, ServerSettings

HTTP = HttpSettings(retries=2, backoff=0.01, max_backoff=0.05, timeout=10)
SHELLS = ["aiohttp", "requests"]

# ---------------------------------------------------------------------------- the policy

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "10.0.0.5": "private",
    "172.16.3.4": "private",
    "192.168.1.1": "private",
    "fd12:3456::1": "private",
    "169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "100.64.0.1": "CGNAT",
    "224.0.0.251": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "0.1.2.3": "this network",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "192.0.2.10": "documentation",
    "198.51.100.7": "documentation",
    "203.0.113.9": "documentation",
    "2001:db8::1": "documentation",
    "192.0.0.8": "IETF protocol",
    "198.18.0.1": "benchmarking",
    "fec0::1": "site-local",
    "::ffff:127.0.0.1": "loopback address (IPv4-mapped 127.0.0.1)",
    "::ffff:169.254.169.254": "link-local address (IPv4-mapped 169.254.169.254)",
    "2002:a00:5::1": "private address (6to4 for 10.0.0.5)",
    "64:ff9b::7f00:1": "loopback address (NAT64 for 127.0.0.1)",
    "64:ff9b:1::1": "local NAT64",
    "2001::1": "IETF protocol",  # Teredo
    "::127.0.0.1": "reserved",  # IPv4-compatible, deprecated
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700::1111", "2a00:1450:4001::1"]
PUBLIC_EMBEDDED = ["::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "kind"), REFUSED.items())
def test_non_public_addresses_are_refused_with_their_kind(address: str, kind: str) -> None:
    reason = check_address(ipaddress.ip_address(address))
    assert reason is not None
    assert kind in reason
    assert "\n" not in reason


@pytest.mark.parametrize("address", PUBLIC + PUBLIC_EMBEDDED)
def test_public_addresses_pass(address: str) -> None:
    assert check_address(ipaddress.ip_address(address)) is None


def test_allowed_keeps_only_public_answers_and_names_the_first_refusal() -> None:
    assert allowed("a.test", ["10.0.0.5", "8.8.8.8", "::1"], str) == ["8.8.8.8"]
    with pytest.raises(AddressRefusedError) as caught:
        allowed("a.test", ["10.0.0.5", "::1"], str)
    assert str(caught.value) == (
        "refused: a.test: 10.0.0.5 is a private address "
        "(http.block_private: only public addresses are fetched)"
    )
    with pytest.raises(AddressRefusedError, match=r"refused: 127\.0\.0\.1 is a loopback"):
        allowed("127.0.0.1", ["127.0.0.1"], str)
    with pytest.raises(AddressRefusedError, match="not an IP address"):
        allowed("a.test", ["not-an-ip"], str)
    with pytest.raises(AddressRefusedError, match="resolved to no address"):
        allowed("a.test", [], str)


def test_a_refusal_is_final() -> None:
    assert issubclass(AddressRefusedError, FetchError)
    assert not issubclass(AddressRefusedError, RetryableFetchError)


# ---------------------------------------------------------------------------- both shells


class Origin:
    """A test server: ``/img`` is a JPEG, ``/go?to=URL`` redirects there; counts hits."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.port = 0

    def app(self) -> web.Application:
        async def img(request: web.Request) -> web.Response:
            self.hits.append(request.path_qs)
            return web.Response(body=render_photo(40, 30, 1, seed=3), content_type="image/jpeg")

        async def go(request: web.Request) -> web.Response:
            self.hits.append(request.path_qs)
            raise web.HTTPFound(request.query["to"])

        app = web.Application()
        app.router.add_get("/img", img)
        app.router.add_get("/go", go)
        return app


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    state = Origin()
    with server_thread(state.app()) as running:
        state.port = running.port
        yield state


@pytest.fixture
def hits(origin: Origin) -> list[str]:
    origin.hits.clear()
    return origin.hits


class FakeResolver(AbstractResolver):
    """aiohttp resolver answering from a table; a name not in it does not exist."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.names:
            raise OSError(f"no such name: {host}")
        return [
            {
                "hostname": host,
                "host": ip,
                "port": port,
                "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for ip in self.names[host]
        ]

    async def close(self) -> None:
        pass


def server_is_public(ip: IPAddress) -> str | None:
    """The policy, except that the test server's 127.0.0.1 counts as a public address."""
    return None if ip == ipaddress.ip_address("127.0.0.1") else check_address(ip)


def fetch(
    shell: str, url: str, names: dict[str, list[str]], check: netguard.Check = check_address
) -> Fetched:
    """``url`` through ``shell`` with a guard that resolves ``names`` and judges by ``check``."""
    if shell == "requests":

        def resolve(host: str, port: int) -> list[str]:
            if host not in names:
                raise socket.gaierror(socket.EAI_NONAME, f"no such name: {host}")
            return names[host]

        session = requests.Session()
        session.trust_env = False
        adapter = GuardedAdapter(max_retries=0, resolve=resolve, check=check)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        with session:
            return fetch_sync(session, url, HTTP, sleep=lambda _: None)

    async def no_sleep(_: float) -> None:
        pass

    async def go() -> Fetched:
        connector = GuardedConnector(resolver=FakeResolver(names), check=check)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await fetch_async(session, url, HTTP, sleep=no_sleep)

    return asyncio.run(go())


NAMES = {
    "loop.test": ["127.0.0.1"],
    "ten.test": ["10.0.0.5"],
    "metadata.test": ["169.254.169.254"],
    "loop6.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "docs.test": ["192.0.2.10"],
}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", NAMES)
def test_a_name_resolving_to_a_non_public_address_is_refused(
    shell: str, name: str, origin: Origin, hits: list[str]
) -> None:
    address = NAMES[name][0]
    with pytest.raises(AddressRefusedError) as caught:
        fetch(shell, f"http://{name}:{origin.port}/img", NAMES)
    message = str(caught.value)
    assert message.startswith(f"refused: {name}: {address} is ")
    assert caught.value.attempts == 1  # final: not retried although retries=2
    assert hits == []  # nothing reached the server


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254", "10.1.2.3"])
def test_an_ip_literal_host_is_refused_without_the_resolver(
    shell: str, host: str, origin: Origin, hits: list[str]
) -> None:
    with pytest.raises(AddressRefusedError, match=r"^refused: [0-9a-f.:]+ is a") as caught:
        fetch(shell, f"http://{host}:{origin.port}/img", {})
    assert caught.value.attempts == 1
    assert hits == []


def fetch_as_configured(shell: str, url: str) -> None:
    """``url`` through the client ``new_session``/``new_client`` build with block_private."""
    http = HttpSettings(retries=2, block_private=True, backoff=0.01, max_backoff=0.05)
    if shell == "requests":
        with new_session(http) as session:
            fetch_sync(session, url, http)
        return

    async def go() -> None:
        async with new_client(http) as session:
            await fetch_async(session, url, http)

    asyncio.run(go())


@pytest.mark.parametrize("shell", SHELLS)
def test_a_real_name_resolving_to_loopback_is_refused(
    shell: str, origin: Origin, hits: list[str]
) -> None:
    """The shells' own resolvers (not injected): ``localhost`` comes from /etc/hosts."""
    with pytest.raises(AddressRefusedError, match=r"^refused: localhost: .* loopback"):
        fetch_as_configured(shell, f"http://localhost:{origin.port}/img")
    assert hits == []


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1"])
def test_legacy_numeric_forms_of_loopback_are_refused(
    shell: str, host: str, origin: Origin, hits: list[str]
) -> None:
    """Forms ``getaddrinfo`` turns into 127.0.0.1: refused after resolution (or, by newer
    aiohttp, as URLs it will not use), never retried, never connected."""
    with pytest.raises(FetchError) as caught:
        fetch_as_configured(shell, f"http://{host}:{origin.port}/img")
    assert caught.value.attempts == 1
    assert hits == []


@pytest.mark.parametrize("shell", SHELLS)
def test_https_is_refused_before_any_handshake(shell: str) -> None:
    with pytest.raises(AddressRefusedError, match=r"^refused: ten\.test: 10\.0\.0\.5 is a"):
        fetch(shell, "https://ten.test/img", NAMES)


@pytest.mark.parametrize("shell", SHELLS)
def test_an_allowed_name_is_fetched(shell: str, origin: Origin, hits: list[str]) -> None:
    names = {"public.test": ["127.0.0.1"]}
    fetched = fetch(shell, f"http://public.test:{origin.port}/img", names, server_is_public)
    assert fetched.data[:3] == b"\xff\xd8\xff"
    assert hits == ["/img"]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("http://ten.test/img", "refused: ten.test: 10.0.0.5 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a link-local"),
        ("http://[::ffff:a00:5]/img", "refused: ::ffff:10.0.0.5 is a private address"),
    ],
)
def test_a_redirect_to_a_non_public_address_is_refused_on_the_hop(
    shell: str, target: str, refused: str, origin: Origin, hits: list[str]
) -> None:
    names = {"public.test": ["127.0.0.1"], "ten.test": ["10.0.0.5"]}
    url = f"http://public.test:{origin.port}/go?to={target}"
    with pytest.raises(AddressRefusedError, match="^" + refused.replace(".", r"\.")) as caught:
        fetch(shell, url, names, server_is_public)
    assert caught.value.attempts == 1
    assert len(hits) == 1 and hits[0].startswith("/go")  # the first hop only


@pytest.mark.parametrize("shell", SHELLS)
def test_a_redirect_between_allowed_hosts_is_followed(
    shell: str, origin: Origin, hits: list[str]
) -> None:
    names = {"public.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]}
    url = f"http://public.test:{origin.port}/go?to=http://cdn.test:{origin.port}/img"
    fetched = fetch(shell, url, names, server_is_public)
    assert fetched.final_url == f"http://cdn.test:{origin.port}/img"
    assert len(hits) == 2


async def test_the_aiohttp_resolver_hands_on_only_allowed_addresses() -> None:
    inner = FakeResolver({"mixed.test": ["10.0.0.5", "127.0.0.1", "::1"]})
    results = await GuardedResolver(inner, server_is_public).resolve("mixed.test", 80)
    assert [r["host"] for r in results] == ["127.0.0.1"]


def test_the_requests_shell_connects_only_to_the_checked_address(
    origin: Origin, hits: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lookup per connection, and the socket opened to the address that was checked
    (never the name again: a second DNS answer could be a private one)."""
    from urllib3.util import connection

    answers = iter([["10.0.0.5", "127.0.0.1"], ["10.0.0.6"]])
    connected: list[Any] = []
    real = connection.create_connection

    def record(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(connection, "create_connection", record)
    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(
        max_retries=0, resolve=lambda host, port: next(answers), check=server_is_public
    )
    session.mount("http://", adapter)
    with session:
        fetch_sync(session, f"http://rebind.test:{origin.port}/img", HTTP)
    assert connected == [("127.0.0.1", origin.port)]
    assert hits == ["/img"]


# ---------------------------------------------------------------------------- the setting


def test_block_private_is_a_setting_off_by_default() -> None:
    assert load_settings(environ={}).http.block_private is False
    env = {"DOWNLOADER_HTTP_BLOCK_PRIVATE": "true"}
    assert load_settings(environ=env).http.block_private is True


async def test_off_leaves_the_clients_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    with new_session(HttpSettings()) as session:
        assert type(session.get_adapter("http://x.test/")) is DeadlineAdapter
        assert proxy_for(session, "http://x.test/") == "http://proxy.test:3128"
    async with new_client(HttpSettings()) as client:
        assert type(client.connector) is aiohttp.TCPConnector
        assert proxy_for(client, "http://x.test/") == "http://proxy.test:3128"


async def test_on_guards_both_clients_and_ignores_proxies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    http = HttpSettings(block_private=True)
    with new_session(http) as session:
        assert isinstance(session.get_adapter("https://x.test/"), GuardedAdapter)
        assert not session.trust_env
        assert proxy_for(session, "http://x.test/") is None
    async with new_client(http) as client:
        assert isinstance(client.connector, GuardedConnector)
        assert not client.trust_env
        assert proxy_for(client, "http://x.test/") is None


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def builtin() -> Iterator[str]:
    """A built-in server of this module's own, so its request counts are ours alone."""
    with server_thread(make_app(ServerSettings(seed=5, pool_size=4))) as running:
        yield running.base_url


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_every_backend_refuses_the_builtin_server_and_sends_it_nothing(
    backend: str, builtin: str, tmp_path: Path
) -> None:
    before = server_stats(builtin)
    url = builtin + "/64/48?lock={i}"
    settings = make_settings(backend, tmp_path, url, 4, block_private=True)
    report = run(settings)
    assert (report.ok, report.failed) == (0, 4)
    port = builtin.rsplit(":", 1)[1]
    for result in report.results:
        assert result.error == (
            "refused: 127.0.0.1 is a loopback address "
            "(http.block_private: only public addresses are fetched)"
        ), result.error
        assert result.attempts == 1
        assert f":{port}/" in result.url
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert server_stats(builtin) == before  # not one request reached it


@pytest.mark.parametrize("backend", ["sync", "asyncio"])
def test_off_fetches_from_the_builtin_server_as_before(
    backend: str, builtin: str, tmp_path: Path
) -> None:
    before = sum(server_stats(builtin).values())
    settings = make_settings(backend, tmp_path, builtin + "/64/48?lock={i}", 3)
    report = run(settings)
    assert (report.ok, report.failed) == (3, 0)
    assert sum(server_stats(builtin).values()) > before


def test_a_local_run_reaches_its_own_server_with_block_private(tmp_path: Path) -> None:
    settings = make_settings("sync", tmp_path, "http://x/64/48?lock={i}", 2, block_private=True)
    report = run(settings.replace(local=True))
    assert (report.ok, report.failed) == (2, 0)
