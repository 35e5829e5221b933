"""The address check in the requests shell: a transport adapter whose connections resolve
the host once, keep only the addresses the check allows, and connect to one of those
(never to a second answer of the DNS: no rebinding between check and connect). urllib3
opens a connection for every redirect hop to a new host, so each hop is checked."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection
from urllib3.util.connection import allowed_gai_family

from ..deadline import DeadlineAdapter
from . import Check, allowed, check_address, parse_ip

Resolve = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of ``host``, as urllib3 would look them up."""
    infos = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Guard:
    resolve: Resolve
    check: Check


class _GuardedConnection(HTTPConnection):
    """``_new_conn`` with the address check; ``guard`` is set on each subclass."""

    guard: _Guard

    def _new_conn(self) -> socket.socket:
        host = self._dns_host.strip("[]")
        try:
            found = [host] if parse_ip(host) else self.guard.resolve(host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        addresses = allowed(host, found, str, self.guard.check)
        error: Exception | None = None
        for address in addresses:
            try:
                return connection.create_connection(
                    (address, self.port),
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except TimeoutError as exc:  # socket.timeout
                error = ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
                )
                error.__cause__ = exc
            except OSError as exc:
                error = NewConnectionError(self, f"Failed to establish a new connection: {exc}")
                error.__cause__ = exc
        assert error is not None  # ``allowed`` returns at least one address
        raise error


def _guarded_pool(pool: type[HTTPConnectionPool], guard: _Guard) -> type[HTTPConnectionPool]:
    """``pool`` whose connections (its own class, e.g. the deadline-tracked one) are
    guarded by ``guard``."""
    base = pool.ConnectionCls
    conn = type(f"Guarded{base.__name__}", (_GuardedConnection, base), {"guard": guard})
    return type(f"Guarded{pool.__name__}", (pool,), {"ConnectionCls": conn})


class GuardedAdapter(DeadlineAdapter):
    """A ``DeadlineAdapter`` that connects only to addresses ``check`` allows.

    ``resolve``: how names become addresses (default: ``getaddrinfo``); tests inject theirs.
    """

    def __init__(
        self, *args: Any, resolve: Resolve = resolve_host, check: Check = check_address, **kw: Any
    ) -> None:
        self._guard = _Guard(resolve, check)  # before super(): it builds the pool manager
        super().__init__(*args, **kw)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        classes = self.poolmanager.pool_classes_by_scheme
        self.poolmanager.pool_classes_by_scheme = {
            scheme: _guarded_pool(pool, self._guard) for scheme, pool in classes.items()
        }
