"""Jobs: what to fetch. A URL template expands lazily into ``Job(index, url)``."""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

PLACEHOLDERS = ("i", "width", "height", "keywords")


@dataclass(frozen=True)
class Job:
    index: int
    url: str


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be fetched, or None when it looks fetchable."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"invalid URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"URL must start with http:// or https://: {url!r}"
    if not parts.hostname:
        return f"URL has no host: {url!r}"
    if any(ord(c) < 33 or c == "\x7f" for c in url):
        return f"URL contains spaces or control characters: {url!r}"
    return None


@dataclass(frozen=True)
class Template:
    """A validated URL template; ``render(i)`` is the URL of job ``i``."""

    text: str
    width: int
    height: int
    keywords: str

    def __post_init__(self) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"bad URL template {self.text!r}: {exc}") from None
        for name in fields:
            if name not in PLACEHOLDERS:
                raise ConfigError(
                    f"unknown placeholder {{{name}}} in URL template; "
                    f"use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                )
        try:
            first = self.render(0)
        except (ValueError, IndexError, KeyError) as exc:
            raise ConfigError(f"bad URL template {self.text!r}: {exc}") from None
        problem = check_url(first)
        if problem:
            raise ConfigError(problem)

    def render(self, index: int) -> str:
        text = self.text
        if not self.keywords:
            # loremflickr's /{w}/{h}/{keywords}: no keywords means no path segment at all.
            text = text.replace("/{keywords}", "")
        return text.format(i=index, width=self.width, height=self.height, keywords=self.keywords)


def expand(template: Template, count: int, start: int = 0) -> Iterator[Job]:
    """Lazily yield ``count`` jobs; memory stays O(1) whatever ``count`` is."""
    for index in range(start, start + count):
        yield Job(index, template.render(index))
