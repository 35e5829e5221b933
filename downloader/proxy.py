"""Which proxy a request goes through: the environment read once, the answer kept per host.

``HTTP_PROXY``, ``HTTPS_PROXY`` and ``ALL_PROXY`` (lowercase too, which wins, as urllib
reads them) name the proxies; ``NO_PROXY`` the hosts that go direct. The client factories
(``fetch.new_session``, ``fetch.new_client``) read them when a client is made, and the
fetch shells hand each request its proxy (requests' ``proxies=``, aiohttp's ``proxy=``)
instead of letting the libraries re-read the environment for every request
(``trust_env``): requests merges it into each request, aiohttp looks it up in a thread
for each one, and so a ``NO_PROXY`` alone, common in containers and CI, nearly doubled
the CPU of a run (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

SCHEMES = ("http", "https", "all")  # HTTP_PROXY, HTTPS_PROXY, ALL_PROXY
DEFAULT_PORTS = {"http": 80, "https": 443}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Proxies:
    """The proxies the environment named when a client was made."""

    urls: tuple[tuple[str, str], ...]  # (scheme of the target: http, https or all, proxy URL)
    no_proxy: str = ""

    @classmethod
    def from_environment(cls) -> Proxies | None:
        """The environment's proxies, or None when it names none (``NO_PROXY`` alone, or
        ``FTP_PROXY``, names none for us)."""
        found = urllib.request.getproxies_environment()
        urls = tuple(
            (scheme, _with_scheme(found[scheme])) for scheme in SCHEMES if found.get(scheme)
        )
        return cls(urls, found.get("no", "")) if urls else None

    def check_aiohttp(self) -> None:
        """aiohttp speaks to http:// and https:// proxies only: another one (socks5://) is
        a ConfigError, rather than requests that go direct behind the user's back."""
        for scheme, url in self.urls:
            kind = urlsplit(url).scheme.lower()
            if kind not in ("http", "https"):
                raise ConfigError(
                    f"{scheme.upper()}_PROXY names a {kind}:// proxy, and the asyncio and "
                    "hybrid backends can use http:// and https:// proxies only: use "
                    "--backend threads, or another proxy"
                )

    def for_url(self, url: str) -> str | None:
        """The proxy for ``url`` (its scheme's, else ``ALL_PROXY``), or None: direct."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:  # no client can use such a URL: it fails there, direct
            return None
        if bypassed(self.no_proxy, host, port):
            return None
        urls = dict(self.urls)
        return urls.get(parts.scheme) or urls.get("all")

    def for_requests(self, url: str) -> dict[str, str]:
        """requests' ``proxies=`` for ``url``: every proxy, keyed by scheme, so that a
        redirect to the other scheme finds its own; none when ``NO_PROXY`` names the host."""
        return {} if self.for_url(url) is None else dict(self.urls)


def _with_scheme(url: str) -> str:
    """``proxy.test:3128`` means ``http://proxy.test:3128``, as requests and curl read it."""
    return url if "://" in url else f"http://{url}"


@functools.lru_cache(maxsize=4096)
def bypassed(no_proxy: str, host: str, port: int | None = None) -> bool:
    """Whether ``no_proxy`` sends ``host`` direct, decided once per host (cached), as curl
    and requests read it: ``*`` is every host; a name is itself and its subdomains (a
    leading dot changes nothing); an IP address or a CIDR network holds the addresses in
    it; an entry with ``:port`` counts for that port only."""
    host = host.lower()
    try:
        address: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.lower().split(","):
        name, entry_port = _split_port(entry.strip())
        if name == "*":
            return True
        if not name or (entry_port is not None and entry_port != port):
            continue
        if address is not None:
            with contextlib.suppress(ValueError):  # a name: not this address
                if address in ipaddress.ip_network(name, strict=False):
                    return True
        elif host == name.lstrip(".") or host.endswith("." + name.lstrip(".")):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, or an entry without a port (a bare IPv6 address has
    more than one colon). A port that is no number matches no port (-1)."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        return inside, (_port(rest[1:]) if rest.startswith(":") else None)
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, _port(port)
    return entry, None


def _port(text: str) -> int:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 5 else -1
