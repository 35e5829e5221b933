"""``--unique``: fetch in rounds until ``count`` images with distinct content are on disk.

A duplicate (same sha256 as an image already kept, e.g. loremflickr's fallback
placeholder, or a photo its pool of ~100 served twice) has its files removed and is
recorded as failed; then more jobs run: new ``{i}`` values, or the same URL again where
the server picks at random. At most ``2 * missing + 20`` extra jobs, then a clear note.

A resumed run (``--resume``, ``--retry-failed``) starts from the distinct images it keeps
(by sha256) and fetches only as many as are still missing, under the same rules.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .backends import Backend
from .jobs import Job, JobSource, JobStream, UrlList, stream
from .record import Recorder
from .result import DUPLICATE, Result
from .resume import Plan
from .settings import Settings
from .stop import StopToken


@dataclass(frozen=True)
class Outcome:
    distinct: int  # images with distinct content on disk, kept ones included
    note: str | None = None  # why the run gave up, if it did


class Distinct:
    """The first image of each sha256; every later one becomes a removed duplicate."""

    def __init__(self, out: Path, kept: dict[int, Result]) -> None:
        self.out = out
        self.seen: dict[str, Result] = {r.sha256: r for r in kept.values() if r.sha256}

    def check(self, result: Result) -> Result:
        if not result.ok or result.sha256 is None:
            return result
        first = self.seen.setdefault(result.sha256, result)
        return result if first is result else self._duplicate(result, first)

    def _duplicate(self, result: Result, first: Result) -> Result:
        for name in (result.path, result.thumbnail):
            # A sha-based name template gives the duplicate the first one's own path: keep it.
            if name and name not in (first.path, first.thumbnail):
                (self.out / name).unlink(missing_ok=True)
        return dataclasses.replace(
            result,
            status="failed",
            path=None,
            thumbnail=None,
            error=f"{DUPLICATE}{first.index} (same sha256); removed",
        )


def first_round(settings: Settings, source: JobSource, plan: Plan, stop: StopToken) -> JobStream:
    """A fresh run's -n jobs; a resumed run's jobs not kept and not known duplicates (a
    URL that gave a duplicate gives it again), as many as images are missing."""
    if not (settings.resume or settings.retry_failed):
        return stream(source.jobs(), source.blocking, stop)
    jobs = (
        job
        for job in source.jobs()
        if job.index not in plan.kept
        and not (job.index in plan.stale and plan.stale[job.index].duplicate)
        and (plan.rerun is None or job.index in plan.rerun or job.index not in plan.stale)
    )
    if isinstance(source, UrlList):
        return stream(jobs, source.blocking, stop)  # no count to reach: each tried once
    return JobStream(itertools.islice(jobs, max(0, settings.count - len(plan.kept))))


def run_rounds(
    backend: Backend,
    source: JobSource,
    settings: Settings,
    plan: Plan,
    record: Recorder,
    stop: StopToken,
) -> Outcome:
    """Run the rounds; ``record`` hears every result (duplicates as failed ones)."""
    distinct = Distinct(settings.out, plan.kept)
    heard = 0

    def keep_unique(result: Result) -> None:
        nonlocal heard
        heard += 1
        record(distinct.check(result))

    wanted = settings.count - len(distinct.seen)
    listed = isinstance(source, UrlList)  # a list has no count to reach, and no extras
    issued = None if listed else wanted
    record.start(issued, len(plan.kept))
    budget = 2 * wanted + 20
    next_index = max([settings.count - 1, *plan.kept, *plan.stale]) + 1
    jobs: Iterable[Job] = first_round(settings, source, plan, stop)
    extras = 0
    while True:
        backend.run(jobs, settings, keep_unique, stop)
        missing = settings.count - len(distinct.seen)
        if missing <= 0 or listed or stop.is_set():
            return Outcome(len(distinct.seen))
        extra = min(missing, budget - extras)
        if extra <= 0:
            return Outcome(len(distinct.seen), _gave_up(settings, len(distinct.seen), heard))
        issued = heard + extra
        record.start(issued, 0)
        jobs = source.extra(next_index, extra)
        next_index, extras = next_index + extra, extras + extra


def _gave_up(settings: Settings, distinct: int, fetches: int) -> str:
    return (
        f"gave up: {distinct} distinct images of {settings.count} wanted after "
        f"{fetches} fetches; the source seems to have no more distinct images"
    )
