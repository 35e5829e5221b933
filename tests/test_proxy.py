"""Proxies: a lone ``NO_PROXY`` costs nothing; with a proxy set, every backend sends through
it (a real forward proxy on loopback, counting what it relays), ``NO_PROXY`` exceptions go
direct, and the decision is taken once per host."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import ImageServer, child_env, cli_args, make_settings, records, run_cli

from downloader.errors import ConfigError
from downloader.fetch import new_client, new_session, proxies_configured, proxy_for
from downloader.pipeline import run
from downloader.proxy import Proxies, bypassed
from downloader.settings import HttpSettings, ThumbnailSettings

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te"}


class ForwardProxy(http.server.ThreadingHTTPServer):
    """A forward HTTP proxy: relays each absolute-form GET to its origin, one connection a
    request, and records the URL it relayed."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Relay)
        self.relayed: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Relay(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # clients keep their connection to the proxy
    server: ForwardProxy

    def do_GET(self) -> None:
        target = urlsplit(self.path)
        if not target.hostname:  # origin-form: this was not sent to a proxy
            self.send_error(400, "not a proxy request")
            return
        with self.server.lock:
            self.server.relayed.append(self.path)
        origin = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            origin.request("GET", target.path + (f"?{target.query}" if target.query else ""),
                           headers=headers)  # fmt: skip
            answer = origin.getresponse()
            body = answer.read()
        finally:
            origin.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    server = ForwardProxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="proxy")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable from the developer's shell reaches this test."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # urllib's CGI rule for HTTP_PROXY
    return monkeypatch


# ---------------------------------------------------------------------------- the environment


@pytest.mark.parametrize("name", ["NO_PROXY", "no_proxy", "FTP_PROXY"])
async def test_no_proxy_alone_names_no_proxy(clean_env: pytest.MonkeyPatch, name: str) -> None:
    clean_env.setenv(name, "127.0.0.1,localhost")
    assert not proxies_configured()
    with new_session(HttpSettings()) as session:
        assert not session.trust_env
        assert proxy_for(session, "http://example.test/") is None
    async with new_client(HttpSettings()) as client:
        assert not client.trust_env
        assert proxy_for(client, "http://example.test/") is None


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
async def test_a_proxy_variable_names_the_proxy_for_both_clients(
    clean_env: pytest.MonkeyPatch, name: str
) -> None:
    clean_env.setenv(name, "http://proxy.test:3128")
    clean_env.setenv("NO_PROXY", "direct.test")
    assert proxies_configured()
    with new_session(HttpSettings()) as session:
        assert not session.trust_env  # handed its proxy with each request instead
        assert proxy_for(session, "http://example.test/a.jpg") == "http://proxy.test:3128"
        assert proxy_for(session, "http://cdn.direct.test/a.jpg") is None
    async with new_client(HttpSettings()) as client:
        assert not client.trust_env
        assert proxy_for(client, "http://example.test/a.jpg") == "http://proxy.test:3128"
        assert proxy_for(client, "http://cdn.direct.test/a.jpg") is None


def test_each_scheme_has_its_proxy_and_all_proxy_the_rest(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTPS_PROXY", "http://secure.test:3128")
    clean_env.setenv("all_proxy", "http://any.test:3128")
    proxies = Proxies.from_environment()
    assert proxies is not None
    assert proxies.for_url("https://example.test/") == "http://secure.test:3128"
    assert proxies.for_url("http://example.test/") == "http://any.test:3128"
    # requests gets them all, so that a redirect to the other scheme finds its own
    assert proxies.for_requests("http://example.test/") == {
        "https": "http://secure.test:3128",
        "all": "http://any.test:3128",
    }


def test_a_lowercase_variable_wins(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", "http://upper.test:1")
    clean_env.setenv("http_proxy", "http://lower.test:2")
    proxies = Proxies.from_environment()
    assert proxies is not None and proxies.for_url("http://x.test/") == "http://lower.test:2"


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("127.0.0.1,localhost", "127.0.0.1", 80, True),
        ("127.0.0.1,localhost", "localhost", 8080, True),
        ("127.0.0.1,localhost", "127.0.0.2", 80, False),
        ("example.com", "cdn.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("EXAMPLE.com", "example.com", 80, True),
        ("10.0.0.0/8, 192.168.1.1", "10.20.30.40", 80, True),
        ("10.0.0.0/8, 192.168.1.1", "192.168.1.2", 80, False),
        ("fd00::/8", "fd12::1", 80, True),
        ("::1", "::1", 80, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 80, False),
        ("localhost:8080", "localhost", 8080, True),
        ("localhost:8080", "localhost", 80, False),
        ("*", "anything.test", 80, True),
        ("", "anything.test", 80, False),
        (" , ,", "anything.test", 80, False),
        ("host:http", "host", 80, False),  # a port that is no number matches none
    ],
)
def test_no_proxy_rules(no_proxy: str, host: str, port: int, direct: bool) -> None:
    assert bypassed(no_proxy, host, port) is direct


def test_the_default_port_counts_for_a_no_proxy_entry_with_a_port(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("HTTP_PROXY", "http://proxy.test:3128")
    clean_env.setenv("NO_PROXY", "intranet.test:80")
    proxies = Proxies.from_environment()
    assert proxies is not None
    assert proxies.for_url("http://intranet.test/a.jpg") is None
    assert proxies.for_url("http://intranet.test:8080/a.jpg") == "http://proxy.test:3128"


def test_block_private_never_uses_a_proxy(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", "http://proxy.test:3128")
    with new_session(HttpSettings(block_private=True)) as session:
        assert proxy_for(session, "http://example.test/") is None


def test_a_proxy_without_a_scheme_is_an_http_proxy(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", "proxy.test:3128")
    proxies = Proxies.from_environment()
    assert proxies is not None and proxies.for_url("http://x.test/") == "http://proxy.test:3128"


def test_requests_reads_its_ca_bundle_once(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """trust_env is off, so the bundle requests would take from the environment is read
    when the session is made; an empty variable does not turn verification off."""
    bundle = tmp_path / "ca.pem"
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    with new_session(HttpSettings()) as session:
        assert session.verify == str(bundle)
    clean_env.setenv("REQUESTS_CA_BUNDLE", "")
    clean_env.setenv("CURL_CA_BUNDLE", "")
    with new_session(HttpSettings()) as session:
        assert session.verify is True


async def test_aiohttp_refuses_a_socks_proxy_rather_than_going_direct(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ConfigError, match=r"^ALL_PROXY names a socks5:// proxy, .* threads"):
        new_client(HttpSettings())
    with new_session(HttpSettings()) as session:  # requests speaks socks (with PySocks)
        assert proxy_for(session, "http://x.test/") == "socks5://127.0.0.1:1080"


def test_the_cli_says_so_in_one_line(image_server: ImageServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = child_env(ALL_PROXY="socks5://127.0.0.1:1080")
    done = run_cli(cli_args("asyncio", image_server.server.base_url, out, 2), tmp_path, env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ALL_PROXY names a socks5:// proxy")
    assert done.stderr.count("\n") == 1, done.stderr


# ---------------------------------------------------------------------------- end to end

COUNT = 6


@dataclass
class Proxied:
    """A test's proxy, image server, scrubbed environment (to set proxy variables in) and
    output folder."""

    proxy: ForwardProxy
    image_server: ImageServer
    env: pytest.MonkeyPatch
    out: Path

    def download(self, backend: str) -> list[int]:
        """The indexes saved by a run of ``backend`` over COUNT images of the image server."""
        url = self.image_server.server.base_url + "/{width}/{height}?lock={i}"
        settings = make_settings(backend, self.out, url, COUNT)
        report = run(settings.replace(thumbnails=ThumbnailSettings(size=0)))
        assert (report.ok, report.failed) == (COUNT, 0), [r.error for r in report.results]
        return sorted(r.index for r in report.results)

    def through_the_proxy(self) -> list[str]:
        """What the proxy relayed, each URL checked to be the image server's."""
        origin = self.image_server.server.base_url
        assert all(url.startswith(origin + "/") for url in self.proxy.relayed), self.proxy.relayed
        return self.proxy.relayed


@pytest.fixture
def proxied(
    proxy: ForwardProxy,
    image_server: ImageServer,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Proxied:
    return Proxied(proxy, image_server, clean_env, tmp_path / "out")


@pytest.mark.parametrize("backend", ["sync", "threads", "asyncio"])
def test_every_request_goes_through_the_proxy(backend: str, proxied: Proxied) -> None:
    proxied.env.setenv("HTTP_PROXY", proxied.proxy.url)
    proxied.env.setenv("NO_PROXY", "elsewhere.test")  # names another host: changes nothing
    assert proxied.download(backend) == list(range(COUNT))
    relayed = proxied.through_the_proxy()
    # each image is a redirect to the photo and the photo: both hops went through it
    assert len(relayed) == 2 * COUNT
    assert sum("/cache/" in url for url in relayed) == COUNT


@pytest.mark.parametrize("backend", ["sync", "threads", "asyncio"])
def test_a_no_proxy_exception_goes_direct(backend: str, proxied: Proxied) -> None:
    proxied.env.setenv("http_proxy", proxied.proxy.url)
    proxied.env.setenv("no_proxy", "localhost,127.0.0.1")
    assert proxied.download(backend) == list(range(COUNT))
    assert proxied.proxy.relayed == []


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_hybrid_workers_use_the_proxy_of_their_environment(
    no_proxy: str, proxied: Proxied, tmp_path: Path
) -> None:
    """hybrid's workers (aiohttp, in processes of their own) through the real CLI, whose
    environment they inherit."""
    out = proxied.out
    env = child_env(HTTP_PROXY=proxied.proxy.url, NO_PROXY=no_proxy)
    base_url = proxied.image_server.server.base_url
    args = [*cli_args("hybrid", base_url, out, COUNT), "--workers", "2"]
    done = run_cli([*args, "--thumbnail-size", "0"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert sorted(line["index"] for line in records(out) if line["status"] == "ok") == list(
        range(COUNT)
    )
    relayed = proxied.through_the_proxy()
    assert len(relayed) == (0 if no_proxy else 2 * COUNT)


def test_the_proxy_is_decided_once_per_host(proxied: Proxied, tmp_path: Path) -> None:
    """Not per request: one look at NO_PROXY for the image server's host, then the cache."""
    proxied.env.setenv("HTTP_PROXY", proxied.proxy.url)
    proxied.env.setenv("NO_PROXY", f"once-{tmp_path.name}.test")  # a key no other test used
    before = bypassed.cache_info()
    proxied.download("asyncio")
    after = bypassed.cache_info()
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == COUNT - 1
    assert len(proxied.proxy.relayed) == 2 * COUNT
