"""Jobs: what to fetch. A URL template or a URL list expands lazily into ``Job(index, url)``;
``source_for`` makes the one the settings ask for."""

from __future__ import annotations

import contextlib
import queue
import string
import threading
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .inputs import Columns, format_of, read_rows
from .settings import Settings

if TYPE_CHECKING:
    from .stop import StopToken

PLACEHOLDERS = ("i", "width", "height", "keywords")


@dataclass(frozen=True)
class Job:
    """One input row to fetch: its index (its place in the input), its URL, and what a
    dataset keeps with it (the caption and additional columns of a URL list)."""

    index: int
    url: str
    caption: str | None = None
    columns: dict[str, Any] | None = None


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be fetched, or None when it looks fetchable."""
    if not url:
        return "empty URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port
        if host:
            host.encode("idna")  # empty or over-long labels: "a..b", 64+ characters
    except (ValueError, UnicodeError) as exc:
        return f"invalid URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"URL must start with http:// or https://: {url!r}"
    if not host:
        return f"URL has no host: {url!r}"
    if any(ord(c) < 33 or c == "\x7f" for c in url):
        return f"URL contains spaces or control characters: {url!r}"
    return None


@dataclass(frozen=True)
class JobStream:
    """Jobs on their way to a backend. ``blocking``: taking the next one may wait on a
    slow producer (a pipe on stdin), so an event loop must not take them itself."""

    jobs: Iterable[Job]
    blocking: bool = False

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)


def may_block(jobs: Iterable[Job]) -> bool:
    """Whether taking the next of ``jobs`` may wait on a slow producer."""
    return isinstance(jobs, JobStream) and jobs.blocking


def stream(jobs: Iterable[Job], blocking: bool, stop: StopToken) -> JobStream:
    """``jobs`` for a backend. A blocking one is read ahead on a thread of its own, so
    that a backend waiting for a slow producer (a pipe) still stops when ``stop`` is set."""
    return JobStream(_read_ahead(jobs, stop) if blocking else jobs, blocking)


_POLL_S = 0.1  # how late a stop may be noticed while the producer is silent


def _read_ahead(jobs: Iterable[Job], stop: StopToken, size: int = 256) -> Iterator[Job]:
    ahead: queue.Queue[Job | None] = queue.Queue(size)  # None: the end
    failure: list[BaseException] = []

    def put(item: Job | None) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ahead.put(item, timeout=_POLL_S)
                return True
        return False

    def pump() -> None:
        try:
            for job in jobs:
                if not put(job):
                    return
        except BaseException as exc:  # a broken stream: the run reports it, not this thread
            failure.append(exc)
        put(None)

    # A daemon: a read blocked on a pipe must not hold up the exit.
    threading.Thread(target=pump, daemon=True, name="job-reader").start()
    while not stop.is_set():
        try:
            item = ahead.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if item is None:
            break
        yield item
    if failure:
        raise failure[0]


class JobSource(Protocol):
    @property
    def blocking(self) -> bool:
        """Whether reading the jobs may wait on a slow producer (a pipe)."""
        ...

    def jobs(self) -> Iterator[Job]:
        """Every job, lazily, in index order."""
        ...

    def urls_for(self, indices: Collection[int]) -> dict[int, str]:
        """The URL of each of ``indices`` (for --resume to check a record still applies)."""
        ...

    def extra(self, start: int, count: int) -> Iterator[Job]:
        """More jobs from index ``start`` (for --unique); none when the source cannot."""
        ...


@dataclass(frozen=True)
class Template:
    """A validated URL template; ``render(i)`` is the URL of job ``i``.

    ``gray`` and ``match`` compose loremflickr's URL forms into a template that has the
    default's ``/{width}/{height}`` and ``/{keywords}`` segments: ``/g/320/240/cat,dog/all``.
    """

    text: str
    width: int
    height: int
    keywords: str
    count: int = 1
    gray: bool = False
    match: str = ""

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
        if self.gray and "/{width}/{height}" not in self.text:
            raise ConfigError("--gray needs a URL template with /{width}/{height}")
        if self.match and "/{keywords}" not in self.text:
            raise ConfigError("--match needs a URL template with /{keywords}")
        try:
            first = self.render(0)
        except (ValueError, IndexError, KeyError) as exc:
            raise ConfigError(f"bad URL template {self.text!r}: {exc}") from None
        problem = check_url(first)
        if problem:
            raise ConfigError(problem)

    def composed(self) -> str:
        text = self.text
        if not self.keywords:
            # loremflickr's /{w}/{h}/{keywords}: no keywords means no path segment at all.
            text = text.replace("/{keywords}", "")
        elif self.match:
            text = text.replace("/{keywords}", "/{keywords}/" + self.match)
        if self.gray:
            text = text.replace("/{width}/{height}", "/g/{width}/{height}", 1)
        return text

    @property
    def blocking(self) -> bool:
        return False

    def render(self, index: int) -> str:
        return self.composed().format(
            i=index, width=self.width, height=self.height, keywords=self.keywords
        )

    def jobs(self) -> Iterator[Job]:
        return self.extra(0, self.count)

    def extra(self, start: int, count: int) -> Iterator[Job]:
        """Lazily yield ``count`` jobs from ``start``: memory O(1) whatever ``count`` is."""
        for index in range(start, start + count):
            yield Job(index, self.render(index))

    def urls_for(self, indices: Collection[int]) -> dict[int, str]:
        # Indices past count too: --unique's extra rounds go on from count.
        return {i: self.render(i) for i in indices if i >= 0}


@dataclass(frozen=True)
class UrlList:
    """URLs from a file (or ``-``, stdin), streamed: one per line (blank lines and ``#``
    comments skipped), a CSV/TSV with a ``url`` column, JSON, JSONL or parquet (see
    ``inputs``). Index = position in the list; a row that is not a URL still gets its index
    and becomes a failed result."""

    path: str
    format: str = "auto"
    columns: Columns = field(default_factory=Columns)

    def __post_init__(self) -> None:
        if self.path != "-":
            if not Path(self.path).is_file():
                raise ConfigError(f"URL list not found: {self.path}")
            read_rows(self.path, self._format, self.columns).close()  # columns checked here
        elif self._format == "parquet":
            raise ConfigError("a parquet URL list must be a file, not stdin")

    @property
    def _format(self) -> str:
        return format_of(self.path, self.format)

    @property
    def blocking(self) -> bool:
        return self.path == "-"

    def jobs(self) -> Iterator[Job]:
        keep = bool(self.columns.caption or self.columns.additional)
        rows = read_rows(self.path, self._format, self.columns)
        try:
            for index, row in enumerate(rows):
                yield Job(index, row.url, row.caption, row.columns or None) if keep else Job(
                    index, row.url
                )
        finally:
            rows.close()

    def extra(self, start: int, count: int) -> Iterator[Job]:
        return iter(())

    def urls_for(self, indices: Collection[int]) -> dict[int, str]:
        wanted = set(indices)
        return {job.index: job.url for job in self.jobs() if job.index in wanted}


# ---------------------------------------------------------------------------- from settings


def template_for(settings: Settings, base_url: str | None = None) -> Template:
    """The validated URL template; with ``base_url`` its scheme and host are replaced."""
    text = settings.url
    if base_url is not None:
        parts = urlsplit(text)
        base = urlsplit(base_url)
        text = urlunsplit((base.scheme, base.netloc, parts.path, parts.query, parts.fragment))
    return Template(
        text,
        settings.width,
        settings.height,
        settings.keywords,
        count=settings.count,
        gray=settings.gray,
        match=settings.match,
    )


def source_for(settings: Settings, base_url: str | None = None) -> JobSource:
    """Where the jobs come from: ``--urls`` or the URL template (validated either way)."""
    if settings.urls:
        dataset = settings.dataset
        return UrlList(settings.urls, dataset.input_format, Columns.of(dataset))
    return template_for(settings, base_url)
