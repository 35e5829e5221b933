"""Which addresses a run may connect to when ``http.block_private`` is on.

A downloader that fetches URLs other people choose (the job service) must not become their
way into the box's own network: loopback, private networks, link-local addresses (cloud
metadata at 169.254.169.254) and every other non-public address are refused. The check is
made on the address actually connected to, after DNS, on every connection (so on every
redirect hop), as image proxies such as camo, imgproxy and Smokescreen do: a public name
that resolves to 127.0.0.1 is refused as well as the literal.

``check_address`` is the policy, pure; ``netguard.aio`` and ``netguard.sync`` apply it in
the aiohttp and requests shells.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import TypeVar

from ..errors import FetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Check = Callable[[IPAddress], "str | None"]
T = TypeVar("T")

WHY = "http.block_private: only public addresses are fetched"

# IANA special-purpose ranges, named; some are "global" on older Pythons' ipaddress.
_SPECIAL = tuple(
    (ipaddress.ip_network(net), kind)
    for net, kind in (
        ("0.0.0.0/8", "a 'this network' address"),  # RFC 791
        ("100.64.0.0/10", "a shared (CGNAT) address"),  # RFC 6598
        ("192.0.0.0/24", "an IETF protocol address"),  # RFC 6890
        ("192.0.2.0/24", "a documentation address"),  # RFC 5737
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),  # RFC 7526
        ("198.18.0.0/15", "a benchmarking address"),  # RFC 2544
        ("2001:db8::/32", "a documentation address"),  # RFC 3849
        ("3fff::/20", "a documentation address"),  # RFC 9637
        ("64:ff9b:1::/48", "a local NAT64 address"),  # RFC 8215
        ("100::/64", "a discard-only address"),  # RFC 6666
        ("2001::/23", "an IETF protocol address"),  # RFC 2928 (Teredo included)
        ("5f00::/16", "an SRv6 address"),  # RFC 9602
        ("fec0::/10", "a site-local address"),  # RFC 3879
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the low 32 bits are IPv4


class AddressRefusedError(FetchError):
    """A connection to a non-public address, refused under ``http.block_private``.
    Final: asking again reaches the same address."""


def check_address(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be connected to, or None when it is a public address.

    ``ipaddress``'s ``is_global`` is the base (IANA's special-purpose registries); the
    explicit checks name the kind in the reason, and cover what ``is_global`` lets through
    on some Python versions (multicast, site-local, IPv4 inside IPv6).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inner, form = _embedded_ipv4(ip)
        if inner is not None:
            kind = _kind(inner)
            shown = f"::ffff:{inner}" if form == "IPv4-mapped" else ip
            return f"{shown} is {kind} ({form} {inner})" if kind else None
    kind = _kind(ip)
    return f"{ip} is {kind}" if kind else None


def _kind(ip: IPAddress) -> str | None:
    flags = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),  # cloud metadata: 169.254.169.254
        (ip.is_multicast, "a multicast address"),
    )
    for hit, kind in flags:
        if hit:
            return kind
    for net, kind in _SPECIAL:
        if ip in net:
            return kind
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    return None if ip.is_global else "not a public address"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, str]:
    """The IPv4 address an IPv6 one reaches, for the forms that reach one."""
    if ip.ipv4_mapped is not None:  # a dual-stack socket connects to it over IPv4
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4 for"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64 for"
    return None, ""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name, or an IP address with or without IPv6's brackets) names
    this machine's loopback: ``localhost``, 127.0.0.0/8, ``::1`` (IPv4-mapped too)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    ip = parse_ip(name)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback


def parse_ip(text: str) -> IPAddress | None:
    """An IP address written as a host (IPv6 without brackets, maybe with a zone), or None."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def refuse_literal(host: str, check: Check = check_address, why: str = WHY) -> None:
    """Raise ``AddressRefusedError`` when ``host`` is an IP address ``check`` refuses;
    ``why``: the rule, as the refusal names it."""
    ip = parse_ip(host)
    reason = check(ip) if ip is not None else None
    if reason:
        raise AddressRefusedError(f"refused: {reason} ({why})")


def allowed(
    host: str,
    candidates: Iterable[T],
    address: Callable[[T], str],
    check: Check = check_address,
    why: str = WHY,
) -> list[T]:
    """The ``candidates`` (what ``host`` resolved to) whose address ``check`` passes.

    Only these may be connected to; when none is left, ``AddressRefusedError`` says why
    the first one was refused.
    """
    kept: list[T] = []
    first: str | None = None
    for candidate in candidates:
        ip = parse_ip(address(candidate))
        reason = check(ip) if ip is not None else f"{address(candidate)!r} is not an IP address"
        if reason is None:
            kept.append(candidate)
        elif first is None:
            first = reason
    if kept:
        return kept
    if first is None:
        raise AddressRefusedError(f"refused: {host} resolved to no address ({why})")
    via = "" if parse_ip(host) is not None else f"{host}: "
    raise AddressRefusedError(f"refused: {via}{first} ({why})")
