"""run(settings): jobs -> backend -> (storage already written) -> manifest -> Report."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
from collections.abc import Iterator

from . import resume, unique
from .backends import Backend, get_backend
from .errors import StorageError, StorageFaultError
from .jobs import JobSource, source_for, stream
from .lock import OutputLock
from .manifest import ManifestWriter, intact_check, read_manifest, store_records
from .record import Observer, Recorder
from .result import Report
from .settings import Settings
from .shards import ShardSet, shard_fault
from .stop import StopToken, stopped_by_signals
from .storage import prepare_out, sweep_temps
from .stores import Store, StoreError, store_for


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
    keep_spans: bool = True,
) -> Report:
    """Download what ``settings`` asks for. Raises ``ConfigError``/``StorageError`` for bad
    settings (``OutputInUseError`` when another run holds OUT); per-image failures are in
    the report, never raised. Setting ``stop`` (from any thread), Ctrl-C or SIGTERM stops
    the run cleanly: the report says ``interrupted``. ``keep_spans``: with
    ``settings.timeline``, the report keeps every span (off when the observer stores them
    itself, as a service job does: a report of 10^5 images then holds none)."""
    stop = stop if stop is not None else StopToken()
    if settings.local and settings.http.block_private:
        # Every URL of a local run points at its own built-in server, on loopback.
        settings = settings.replace(http=dataclasses.replace(settings.http, block_private=False))
    backend = get_backend(settings.backend)
    source_for(settings)  # a bad template or URL list is a ConfigError before OUT is touched
    store = store_for(settings.out, settings.store)
    if store.remote:
        store.check()  # reachable and writable, before a worker starts or an image is fetched
    # One run per OUT: a second one stops here, OUT untouched (a URL's state folder and
    # the URL itself are both held).
    with OutputLock(settings.out), store.lock(settings.out):
        prepare = getattr(backend, "prepare", None)
        if prepare is not None:
            prepare(settings)  # e.g. boot worker processes while OUT and the manifest are read
        return _run_locked(
            backend, settings, store, observer, stop, keep_results=keep_results,
            keep_spans=keep_spans,
        )  # fmt: skip


def _run_locked(
    backend: Backend,
    settings: Settings,
    store: Store,
    observer: Observer | None,
    stop: StopToken,
    *,
    keep_results: bool,
    keep_spans: bool,
) -> Report:
    prepare_out(settings.out)
    report = Report(backend.name)
    with stopped_by_signals(stop), _source(settings) as source:
        plan = _plan(settings, source, store)
        report.skipped = len(plan.kept)
        with ManifestWriter(settings.out, plan.lines, plan.stale.values()) as manifest:
            shards = _shards(settings, backend, plan, store)
            record = Recorder(
                manifest, report, observer, keep_results, keep_spans, stop, shards
            )
            usage = _Usage()
            if settings.unique:
                outcome = unique.run_rounds(backend, source, settings, plan, record, stop)
                report.unique, report.note = outcome.distinct, outcome.note
            else:
                record.start(plan.to_run(settings), len(plan.kept))
                jobs = stream(plan.jobs(source), source.blocking, stop)
                with _closing(shards, report, stop):
                    backend.run(jobs, settings, record, stop)
            usage.finish(report)
    report.interrupted = stop.is_set()
    report.stop_reason = stop.reason
    sweep_temps(settings.out)
    return report


def _plan(settings: Settings, source: JobSource, store: Store) -> resume.Plan:
    """What a --resume or --retry-failed run keeps. A URL OUT's records are its local
    manifest's or, when there is none (the state folder lost, or on another machine),
    the ``NNNNN.jsonl`` lines of its committed shards."""
    if not (settings.resume or settings.retry_failed):
        return resume.Plan()
    try:
        records = read_manifest(settings.out)
        if store.remote and not records:
            records = store_records(store)
        intact = intact_check(settings.out, store)
        return resume.plan(settings, records, source.urls_for, intact)
    except StoreError as exc:  # the store went away since its check
        raise StorageError(str(exc)) from None


def _shards(
    settings: Settings, backend: Backend, plan: resume.Plan, store: Store
) -> ShardSet | None:
    """The shard writers of a shard format, unless the backend's workers write their own
    shards (dask)."""
    dataset = settings.dataset
    if not dataset.shards:
        return None
    carry = getattr(backend, "carry", None)
    if carry is not None:  # its workers write the shards: they carry these rows over
        carry([*plan.carried, *plan.kept], dataset.samples_per_shard)
        return None
    return ShardSet(
        settings.out,
        dataset.output_format,
        dataset.samples_per_shard,
        bool(dataset.caption_col),
        prior={**plan.carried, **plan.kept},
        total=None if settings.urls else settings.count,
        store=store,
    )


@contextlib.contextmanager
def _closing(shards: ShardSet | None, report: Report, stop: StopToken) -> Iterator[None]:
    """Commit the shards still open when the run ends, or is interrupted (a resumed run
    completes them); after a storage fault or a crash, drop them (their rows are fetched
    again by --resume)."""
    try:
        yield
    except BaseException:
        if shards is not None:
            shards.close(commit=False)
        raise
    if shards is None:
        return
    if report.fault is not None:
        shards.close(commit=False)
        return
    try:
        shards.close()
    except OSError as exc:
        report.fault = shard_fault(exc, shards.out)
        stop.set(str(StorageFaultError(report.fault)))
        shards.close(commit=False)


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
