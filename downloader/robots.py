"""The ``X-Robots-Tag`` opt-out: a pure decision over a response's header values.

Each value is a comma-separated list of directives, optionally scoped to one crawler by a
``name:`` prefix (``otherbot: noai, noindex``); a value may also carry a directive that has
its own colon (``unavailable_after: 2026-01-01``), which is not a scope. A directive is
binding when the value is unscoped, or scoped to our ``--user-agent-token``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

# Directives that take a value after a colon: their name is not a crawler's.
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


@functools.cache
def parse_directives(text: str) -> tuple[str, ...]:
    """``--disallowed-header-directives``: comma-separated, case-insensitive; ``''``: none."""
    return tuple(d for d in (part.strip().lower() for part in text.split(",")) if d)


def disallowed(values: Iterable[str], directives: Iterable[str], agent: str = "") -> str | None:
    """The first binding directive of ``values`` that is in ``directives``, or None."""
    banned = set(directives)
    if not banned:
        return None
    me = agent.strip().lower()
    for value in values:
        scope, directives_text = _split_scope(value)
        if scope is not None and scope != me:
            continue
        for directive in directives_text.split(","):
            name = directive.strip().lower().split(":", 1)[0].strip()
            if name in banned:
                return name
    return None


def _split_scope(value: str) -> tuple[str | None, str]:
    head, sep, rest = value.partition(":")
    name = head.strip().lower()
    if not sep or name in _VALUED or "," in head or " " in name:
        return None, value
    return name, rest


def user_agent(base: str, token: str) -> str:
    """The User-Agent with ``--user-agent-token`` in it, as img2dataset sends it."""
    return f"{base} (compatible; {token})" if token else base
