"""run(settings): jobs -> backend -> (storage already written) -> manifest -> Report."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

from .backends import Backend, Emit, get_backend
from .jobs import Job, JobSource, Template, UrlList
from .lock import OutputLock
from .manifest import ManifestWriter, read_manifest, still_valid
from .record import Observer, Recorder
from .result import DUPLICATE, Report, Result
from .settings import Settings
from .stop import StopToken, stopped_by_signals
from .storage import prepare_out, sweep_temps


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
        return UrlList(settings.urls)
    return template_for(settings, base_url)


@contextlib.contextmanager
def _source(settings: Settings) -> Iterator[JobSource]:
    """The jobs to fetch: as configured, or pointed at a built-in server."""
    if not settings.local:
        yield source_for(settings)
        return
    from .server import server_process

    with server_process(settings.server.replace_port(0)) as server:
        yield source_for(settings, server.base_url)


def run(
    settings: Settings,
    observer: Observer | None = None,
    keep_results: bool = True,
    stop: StopToken | None = None,
) -> Report:
    """Download what ``settings`` asks for. Raises ``ConfigError``/``StorageError`` for bad
    settings (``OutputInUseError`` when another run holds OUT); per-image failures are in
    the report, never raised. Setting ``stop`` (from any thread), Ctrl-C or SIGTERM stops
    the run cleanly: the report says ``interrupted``."""
    stop = stop if stop is not None else StopToken()
    if settings.local and settings.http.block_private:
        # Every URL of a local run points at its own built-in server, on loopback.
        settings = settings.replace(http=dataclasses.replace(settings.http, block_private=False))
    backend = get_backend(settings.backend)
    source_for(settings)  # a bad template or URL list is a ConfigError before OUT is touched
    prepare = getattr(backend, "prepare", None)
    if prepare is not None:
        prepare(settings)  # e.g. boot worker processes while OUT and the manifest are read
    with OutputLock(settings.out):  # one run per OUT: a second one stops here, OUT untouched
        return _run_locked(backend, settings, observer, keep_results, stop)


def _run_locked(
    backend: Backend,
    settings: Settings,
    observer: Observer | None,
    keep_results: bool,
    stop: StopToken,
) -> Report:
    prepare_out(settings.out)
    report = Report(backend.name)
    with stopped_by_signals(stop), _source(settings) as source:
        records = read_manifest(settings.out) if settings.resume or settings.retry_failed else {}
        # Records beyond this run's -n are carried over as they are: a --retry-failed
        # without the first run's -n must not drop their lines.
        carried = {} if settings.urls else {i: r for i, r in records.items() if i >= settings.count}
        kept = _kept(settings, source, {i: r for i, r in records.items() if i not in carried})
        # --retry-failed re-runs every recorded index it does not keep: the failed ones,
        # and ok ones whose file is gone or altered (so none loses its manifest line).
        rerun = set(records) - kept.keys() - carried.keys() if settings.retry_failed else None
        report.skipped = len(kept)
        if observer is not None:
            observer.start(_count_to_run(settings, kept, rerun), len(kept))
        # The old lines of what runs again stay until replaced: an interrupted re-run
        # leaves every index it did not reach with the line it had.
        stale = [r for i, r in records.items() if i not in kept and i not in carried]
        with ManifestWriter(settings.out, [*carried.values(), *kept.values()], stale) as manifest:
            record = Recorder(manifest, report, observer, keep_results)
            usage = _Usage()
            if settings.unique:
                _run_unique(backend, source, settings, record, observer, report, stop)
            else:
                backend.run(_jobs_to_run(source, kept, rerun), settings, record, stop)
            usage.finish(report)
    report.interrupted = stop.is_set()
    report.stop_reason = stop.reason
    sweep_temps(settings.out)
    return report


# ---------------------------------------------------------------------------- unique


def _run_unique(
    backend: Backend,
    source: JobSource,
    settings: Settings,
    emit: Emit,
    observer: Observer | None,
    report: Report,
    stop: StopToken,
) -> None:
    """Fetch until ``count`` images with distinct content are on disk.

    A duplicate (same sha256 as an image already kept, e.g. loremflickr's fallback
    placeholder, or a photo its pool of ~100 served twice) has its files removed and is
    recorded as failed; then more jobs run: new ``{i}`` values, or the same URL again where
    the server picks at random. At most ``2 * count + 20`` extra jobs, then a clear note.
    """
    seen: dict[str, Result] = {}

    def keep_unique(result: Result) -> None:
        if result.ok and result.sha256 is not None:
            first = seen.setdefault(result.sha256, result)
            if first is not result:
                result = _as_duplicate(settings, result, first)
        emit(result)

    budget = 2 * settings.count + 20
    jobs, next_index, issued = source.jobs(), settings.count, settings.count
    while True:
        backend.run(jobs, settings, keep_unique, stop)
        missing = settings.count - len(seen)
        if missing <= 0 or isinstance(source, UrlList) or stop.is_set():
            break
        extra = min(missing, budget - (issued - settings.count))
        if extra <= 0:
            report.note = (
                f"gave up: {len(seen)} distinct images of {settings.count} wanted after "
                f"{issued} fetches; the source seems to have no more distinct images"
            )
            break
        if observer is not None:
            observer.start(issued + extra, 0)
        jobs, next_index, issued = (
            source.extra(next_index, extra),
            next_index + extra,
            issued + extra,
        )
    report.unique = len(seen)


def _as_duplicate(settings: Settings, result: Result, first: Result) -> Result:
    for name in (result.path, result.thumbnail):
        # A sha-based name template gives the duplicate the first one's own path: keep it.
        if name and name not in (first.path, first.thumbnail):
            (settings.out / name).unlink(missing_ok=True)
    return dataclasses.replace(
        result,
        status="failed",
        path=None,
        thumbnail=None,
        error=f"{DUPLICATE}{first.index} (same sha256); removed",
    )


# ---------------------------------------------------------------------------- resume


def _same_job(record: Result, url: str | None, local: bool) -> bool:
    if url is None:
        return False
    if record.url == url:
        return True
    # The built-in server gets a new port each run: compare what was asked of it.
    old, new = urlsplit(record.url), urlsplit(url)
    return local and (old.path, old.query) == (new.path, new.query)


def _kept(settings: Settings, source: JobSource, records: dict[int, Result]) -> dict[int, Result]:
    """Records --resume / --retry-failed keep: ok, same URL, file intact (sha256)."""
    candidates = {i: r for i, r in records.items() if r.ok}
    if not candidates:
        return {}  # and a streamed source (stdin) is left unread
    urls = source.urls_for(candidates)
    return {
        index: record
        for index, record in candidates.items()
        if _same_job(record, urls.get(index), settings.local) and still_valid(settings.out, record)
    }


def _jobs_to_run(
    source: JobSource, kept: dict[int, Result], rerun: set[int] | None
) -> Iterable[Job]:
    if rerun is not None:
        return (job for job in source.jobs() if job.index in rerun)
    if kept:
        return (job for job in source.jobs() if job.index not in kept)
    return source.jobs()


def _count_to_run(
    settings: Settings, kept: dict[int, Result], rerun: set[int] | None
) -> int | None:
    if rerun is not None:
        return len(rerun)
    if settings.urls:
        return None  # a streamed list is not counted up front
    return settings.count - len(kept)


# ---------------------------------------------------------------------------- usage


class _Usage:
    """Wall time, CPU seconds (this process and its reaped children), peak RSS."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu = _cpu()

    def finish(self, report: Report) -> None:
        report.wall_s = time.perf_counter() - self.start
        report.cpu_s = _cpu() - self.cpu
        scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss is KiB on Linux
        peak = max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        )
        report.peak_rss_mb = peak * scale / 2**20


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
