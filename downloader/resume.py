"""What a resumed run keeps and what it runs again: pure functions over manifest records.

``--resume`` keeps every image the manifest records as ok whose URL is unchanged and whose
file still has the recorded sha256, and runs the rest. ``--retry-failed`` runs only the
recorded indices it does not keep. The file checks and the source's URLs come in as
functions, so the decisions here can be tested without a disk or a server.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .jobs import Job, JobSource
from .result import Result
from .settings import Settings

UrlsFor = Callable[[Collection[int]], Mapping[int, str]]
Intact = Callable[[Result], bool]


@dataclass(frozen=True)
class Plan:
    """A run's starting point, from the records of the run(s) before it."""

    kept: dict[int, Result] = field(default_factory=dict)  # not fetched again
    carried: dict[int, Result] = field(default_factory=dict)  # beyond this run's -n, as is
    stale: dict[int, Result] = field(default_factory=dict)  # a line until replaced
    rerun: frozenset[int] | None = None  # --retry-failed: only these; None: all not kept

    @property
    def lines(self) -> list[Result]:
        """The records the new manifest starts with (the stale ones follow them)."""
        return [*self.carried.values(), *self.kept.values()]

    def jobs(self, source: JobSource) -> Iterator[Job]:
        """The jobs this run fetches, lazily, in index order."""
        if self.rerun is not None:
            return (job for job in source.jobs() if job.index in self.rerun)
        if self.kept:
            return (job for job in source.jobs() if job.index not in self.kept)
        return source.jobs()

    def to_run(self, settings: Settings) -> int | None:
        """How many jobs ``jobs`` yields; None for a streamed list (not counted up front)."""
        if self.rerun is not None:
            return len(self.rerun)
        if settings.urls:
            return None
        return settings.count - len(self.kept)


def plan(
    settings: Settings, records: Mapping[int, Result], urls_for: UrlsFor, intact: Intact
) -> Plan:
    """Where a run with ``settings`` starts, given the manifest's ``records``.

    Records beyond this run's -n are carried over as they are: a --retry-failed without the
    first run's -n must not drop their lines. (A --unique run's extra rounds live beyond
    -n: there, every record is the run's own.) --retry-failed re-runs every recorded index
    it does not keep: the failed ones, and ok ones whose file is gone or altered.
    """
    if not records:
        return Plan()
    beyond = not settings.urls and not settings.unique
    carried = {i: r for i, r in records.items() if beyond and i >= settings.count}
    own = {i: r for i, r in records.items() if i not in carried}
    kept = kept_records(own, urls_for, intact, settings.local)
    if settings.unique:
        kept = first_of_each_image(kept)
    stale = {i: r for i, r in own.items() if i not in kept}
    rerun = frozenset(stale) if settings.retry_failed else None
    return Plan(kept, carried, stale, rerun)


def kept_records(
    records: Mapping[int, Result], urls_for: UrlsFor, intact: Intact, local: bool
) -> dict[int, Result]:
    """The ok records whose job is unchanged and whose files are intact."""
    candidates = {i: r for i, r in records.items() if r.ok}
    if not candidates:
        return {}  # and a streamed source (stdin) is left unread
    urls = urls_for(candidates)
    return {
        index: record
        for index, record in candidates.items()
        if same_job(record, urls.get(index), local) and intact(record)
    }


def first_of_each_image(records: Mapping[int, Result]) -> dict[int, Result]:
    """Of records with the same sha256, the one with the lowest index (--unique keeps one)."""
    seen: dict[str | None, int] = {}
    for index in sorted(records):
        seen.setdefault(records[index].sha256, index)
    return {index: records[index] for index in sorted(seen.values())}


def same_job(record: Result, url: str | None, local: bool) -> bool:
    """Whether ``record`` is the outcome of fetching ``url`` (None: the index is gone)."""
    if url is None:
        return False
    if record.url == url:
        return True
    # The built-in server gets a new port each run: compare what was asked of it.
    old, new = urlsplit(record.url), urlsplit(url)
    return local and (old.path, old.query) == (new.path, new.query)
