"""run(settings): jobs -> backend -> (storage already written) -> manifest -> Report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import sys
import time
from collections.abc import Iterator

from . import resume, unique
from .backends import Backend, get_backend
from .jobs import JobSource, source_for, stream
from .lock import OutputLock
from .manifest import ManifestWriter, read_manifest, still_valid
from .record import Observer, Recorder
from .result import Report
from .settings import Settings
from .stop import StopToken, stopped_by_signals
from .storage import prepare_out, sweep_temps


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
    with OutputLock(settings.out):  # one run per OUT: a second one stops here, OUT untouched
        prepare = getattr(backend, "prepare", None)
        if prepare is not None:
            prepare(settings)  # e.g. boot worker processes while OUT and the manifest are read
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
        plan = _plan(settings, source)
        report.skipped = len(plan.kept)
        with ManifestWriter(settings.out, plan.lines, plan.stale.values()) as manifest:
            record = Recorder(manifest, report, observer, keep_results, stop)
            usage = _Usage()
            if settings.unique:
                outcome = unique.run_rounds(backend, source, settings, plan, record, stop)
                report.unique, report.note = outcome.distinct, outcome.note
            else:
                record.start(plan.to_run(settings), len(plan.kept))
                jobs = stream(plan.jobs(source), source.blocking, stop)
                backend.run(jobs, settings, record, stop)
            usage.finish(report)
    report.interrupted = stop.is_set()
    report.stop_reason = stop.reason
    sweep_temps(settings.out)
    return report


def _plan(settings: Settings, source: JobSource) -> resume.Plan:
    if not (settings.resume or settings.retry_failed):
        return resume.Plan()
    return resume.plan(
        settings,
        read_manifest(settings.out),
        source.urls_for,
        functools.partial(still_valid, settings.out),
    )


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
