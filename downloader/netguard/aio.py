"""The address check in the aiohttp shell: a connector whose resolver keeps only allowed
addresses, and which refuses IP-literal hosts itself (aiohttp connects to those without
asking the resolver). The connector sees every connection, each redirect hop included."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from . import Check, allowed, check_address, refuse_literal


class GuardedResolver(AbstractResolver):
    """``inner``'s answers, less the addresses ``check`` refuses: the connector connects
    only to what this returns, so the address checked is the address connected to."""

    def __init__(self, inner: AbstractResolver, check: Check = check_address) -> None:
        self._inner = inner
        self._check = check

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        return allowed(host, results, lambda result: result["host"], self._check)

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that connects only to addresses ``check`` allows.

    ``resolver``: the one to ask for names (default: aiohttp's); tests inject their own.
    """

    def __init__(
        self,
        *,
        resolver: AbstractResolver | None = None,
        check: Check = check_address,
        **kwargs: Any,
    ) -> None:
        self._guard = GuardedResolver(resolver or aiohttp.DefaultResolver(), check)
        self._check = check
        super().__init__(resolver=self._guard, **kwargs)

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Any:
        refuse_literal(req.url.raw_host or "", self._check)
        return await super().connect(req, traces, timeout)

    async def close(self, **kwargs: Any) -> None:
        # The connector closes only a resolver it made itself: close ours.
        try:
            await super().close(**kwargs)
        finally:
            await self._guard.close()
