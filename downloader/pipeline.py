"""run(settings): jobs -> backend -> (storage already written) -> manifest -> Report."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from .backends import get_backend
from .jobs import Job, Template, expand
from .result import Report, Result
from .settings import Settings
from .storage import ManifestWriter, prepare_out, read_manifest, still_valid, sweep_temps


class Observer(Protocol):
    """What a UI (the CLI's progress bar) hears from a run."""

    def start(self, to_run: int, kept: int) -> None: ...

    def result(self, result: Result) -> None: ...


def template_for(settings: Settings, base_url: str | None = None) -> Template:
    """The validated URL template; with ``base_url`` its scheme and host are replaced."""
    text = settings.url
    if base_url is not None:
        parts = urlsplit(text)
        base = urlsplit(base_url)
        text = urlunsplit((base.scheme, base.netloc, parts.path, parts.query, parts.fragment))
    return Template(text, settings.width, settings.height, settings.keywords)


@contextlib.contextmanager
def _source(settings: Settings) -> Iterator[Template]:
    """The template to fetch from: as configured, or pointed at a built-in server."""
    if not settings.local:
        yield template_for(settings)
        return
    from .server import server_process

    with server_process(settings.server.replace_port(0)) as server:
        yield template_for(settings, server.base_url)


def run(settings: Settings, observer: Observer | None = None, keep_results: bool = True) -> Report:
    """Download ``settings.count`` images. Raises ``ConfigError``/``StorageError`` for bad
    settings; per-image failures are in the report, never raised. Ctrl-C or SIGTERM stops
    the run cleanly: the report says ``interrupted``."""
    backend = get_backend(settings.backend)
    template_for(settings)  # a bad template is a ConfigError before OUT is touched
    prepare_out(settings.out)
    report = Report(backend.name)
    with _source(settings) as template:
        kept = _kept(settings, template)
        report.skipped = len(kept)
        jobs = _jobs_to_run(settings, template, kept)
        if observer is not None:
            observer.start(_count_to_run(settings, kept), len(kept))
        with ManifestWriter(settings.out, iter(kept.values())) as manifest:

            def emit(result: Result) -> None:
                manifest.write(result)
                report.add(result)
                if keep_results:
                    report.results.append(result)
                if observer is not None:
                    observer.result(result)

            usage = _Usage()
            try:
                with _interruptible():
                    backend.run(jobs, settings, emit)
            except KeyboardInterrupt:
                report.interrupted = True
            usage.finish(report)
    sweep_temps(settings.out)
    return report


# ---------------------------------------------------------------------------- resume


def _same_job(record: Result, job: Job, local: bool) -> bool:
    if record.url == job.url:
        return True
    # The built-in server gets a new port each run: compare what was asked of it.
    old, new = urlsplit(record.url), urlsplit(job.url)
    return local and (old.path, old.query) == (new.path, new.query)


def _kept(settings: Settings, template: Template) -> dict[int, Result]:
    """Records --resume / --retry-failed keep: ok, same URL, file intact (sha256)."""
    if not (settings.resume or settings.retry_failed):
        return {}
    kept: dict[int, Result] = {}
    for index, record in read_manifest(settings.out).items():
        if 0 <= index < settings.count and record.ok:
            job = Job(index, template.render(index))
            if _same_job(record, job, settings.local) and still_valid(settings.out, record):
                kept[index] = record
    return kept


def _failed_before(settings: Settings) -> set[int]:
    records = read_manifest(settings.out)
    return {i for i, r in records.items() if 0 <= i < settings.count and not r.ok}


def _jobs_to_run(settings: Settings, template: Template, kept: dict[int, Result]) -> Iterable[Job]:
    if settings.retry_failed:
        wanted = sorted(_failed_before(settings) - kept.keys())
        return (Job(i, template.render(i)) for i in wanted)
    if kept:
        return (job for job in expand(template, settings.count) if job.index not in kept)
    return expand(template, settings.count)


def _count_to_run(settings: Settings, kept: dict[int, Result]) -> int:
    if settings.retry_failed:
        return len(_failed_before(settings) - kept.keys())
    return settings.count - len(kept)


# ---------------------------------------------------------------------------- signals


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM stops a run the way Ctrl-C does (KeyboardInterrupt: stop scheduling, cancel
    what is in flight, flush, summarise); a second Ctrl-C or SIGTERM exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted:
            os._exit(130)
        interrupted = True
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
