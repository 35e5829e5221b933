"""dask: the asyncio pipeline, one shard of jobs at a time, on a Dask cluster.

Without ``dask.scheduler`` a ``LocalCluster`` of worker processes sized to the machine is
started; with it, the client connects to ``tcp://HOST:8786``. Each shard (``dask.shard_size``
jobs) runs fetch, validate, thumbnail and atomic write on a worker and returns its Results;
only the client writes the manifest, so it keeps exactly one line per index. When a worker
dies mid-shard Dask runs the shard again elsewhere; files already written are recognised by
their content (``storage.write_files`` skips identical bytes) instead of written twice.

OUT must be a folder every worker can write (a shared file system), or, for the shard
formats, a URL (``s3://bucket/prefix``): each worker then writes its shards straight to
the store, through a temp file on its own disk, and nothing but the client's manifest
needs a shared folder. Each worker proves it can write OUT before any work is sent. A
worker that dies mid-shard has committed nothing of it: Dask runs the shard again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, as_completed

from ..children import cpu_count
from ..errors import ClusterUnreachableError, DownloaderError, StorageError
from ..jobs import Job
from ..placement import placement
from ..result import Result
from ..settings import Settings
from ..shards import ShardWriter, hand_over, shard_fault
from ..stop import StopToken
from ..storage import check_writable
from ..stores import store_for
from .base import Emit
from .pools import chunked

CONNECT_TIMEOUT_S = 10.0  # how long to keep trying a scheduler that does not answer


def run_shard(
    jobs: list[Job], settings: Settings, carried: frozenset[int] = frozenset()
) -> list[Result]:
    """On a worker: the asyncio pipeline over one shard, its CPU stage and its writes in
    threads (``placement``: a worker may not start a process pool, and OUT is a shared
    file system). A shard format's shard is written here too (``write_shard``)."""
    if settings.dataset.shards and jobs:
        return write_shard(jobs, settings, carried)
    return _run(jobs, settings, lambda result: result)


def _run(jobs: list[Job], settings: Settings, keep: Callable[[Result], Result]) -> list[Result]:
    from .aio import run_pipeline

    results: list[Result] = []
    stop = StopToken()  # a storage fault stops the shard at once: no fetching in vain

    def emit(result: Result) -> None:
        kept = keep(result)  # a shard's write may fail here: that stops the shard too
        results.append(kept)
        if kept.fault:
            stop.set(kept.fault.cause)

    asyncio.run(run_pipeline(jobs, settings, emit, stop, placement(settings, "dask")))
    return results


def write_shard(jobs: list[Job], settings: Settings, carried: frozenset[int]) -> list[Result]:
    """On a worker: a shard format's shard, written whole here (the client only writes the
    manifest). Each sample goes to the shard's temp file as it is made (the worker holds
    no shard in memory); the rows the client's plan does not fetch again (``carried``) are
    copied from the committed shard this one replaces. The Results go back without their
    samples, or all marked with the storage fault that kept the shard from being written."""
    dataset = settings.dataset
    shard = jobs[0].index // dataset.samples_per_shard
    # A URL store's temp files go to this worker's own disk, removed with the task.
    scratch = Path(tempfile.mkdtemp(prefix="downloader-shard-")) if settings.store else None
    try:
        store = store_for(settings.out, settings.store, scratch)
        writer = ShardWriter(store, shard, dataset.output_format, bool(dataset.caption_col))
        try:
            writer.seed(carried.__contains__)
            results = _run(jobs, settings, lambda r: hand_over(writer.add, r, settings.out))
            if not any(r.fault for r in results):
                writer.commit()
            else:
                writer.abort()
        except BaseException:
            writer.abort()
            raise
    except OSError as exc:
        fault = shard_fault(exc, settings.out)
        return [dataclasses.replace(r, sample=None, fault=fault) for r in _unwritten(jobs)]
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return results


def _unwritten(jobs: list[Job]) -> list[Result]:
    """Results for a shard that could not be written: each job failed (never recorded:
    the fault stops the run, and --resume fetches them again)."""
    return [Result(index=job.index, url=job.url, status="failed") for job in jobs]


def check_out(out: str, url: str = "") -> str | None:
    """On a worker: why it cannot write OUT (the shared folder ``out``, or the store at
    ``url``), or None."""
    try:
        if url:
            with tempfile.TemporaryDirectory(prefix="downloader-check-") as scratch:
                store_for(Path(out), url, Path(scratch)).check()
        else:
            check_writable(Path(out))
    except DownloaderError as exc:
        return str(exc)
    return None


class DaskBackend:
    name = "dask"

    def __init__(self) -> None:
        self._carried: dict[int, frozenset[int]] = {}  # shard -> its carried rows

    def carry(self, indices: Iterable[int], samples_per_shard: int) -> None:
        """The rows earlier runs recorded that this run does not fetch again (kept by
        --resume, or beyond its -n): a shard rewritten by a worker carries them over, and
        only them (a fresh run into a folder of old shards carries none)."""
        by_shard: dict[int, set[int]] = {}
        for index in indices:
            by_shard.setdefault(index // samples_per_shard, set()).add(index)
        self._carried = {shard: frozenset(rows) for shard, rows in by_shard.items()}

    def _carried_in(self, chunk: list[Job], settings: Settings) -> frozenset[int]:
        if not settings.dataset.shards or not chunk:
            return frozenset()
        return self._carried.get(chunk[0].index // settings.dataset.samples_per_shard, frozenset())

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        """A stop sends no more shards; the shards already on a worker finish (each request
        bounded by its deadline) and all their results are recorded."""
        with self._client(settings) as client:
            self._check_workers(client, settings)
            in_flight = 2 * max(1, sum(client.nthreads().values()))
            shards = _chunks(jobs, settings)
            pending = as_completed()

            def submit(chunk: list[Job]) -> None:
                carried = self._carried_in(chunk, settings)
                pending.add(client.submit(run_shard, chunk, settings, carried, pure=False))

            for first in itertools.islice(shards, 0 if stop.is_set() else in_flight):
                submit(first)
            for future in pending:
                for result in future.result():
                    emit(result)
                future.release()
                shard = None if stop.is_set() else next(shards, None)
                if shard is not None:
                    submit(shard)

    @staticmethod
    @contextlib.contextmanager
    def _client(settings: Settings) -> Iterator[Client]:
        """A client of the given scheduler, or of a LocalCluster that is closed with it."""
        if settings.dask.scheduler:
            try:
                client = Client(settings.dask.scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                raise ClusterUnreachableError(
                    f"cannot reach the Dask scheduler {settings.dask.scheduler}: {exc}"
                ) from None
            with client:
                yield client
            return
        with (
            LocalCluster(
                n_workers=settings.dask.workers or cpu_count(),
                threads_per_worker=1,
                processes=True,
                # The scheduler's HTTP server starts whatever we ask: on a free port, it
                # never collides with another cluster's 8787.
                dashboard_address="127.0.0.1:0",
                silence_logs=50,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client

    @staticmethod
    def _check_workers(client: Client, settings: Settings) -> None:
        """Every worker can write OUT, or the run stops before any work is sent."""
        out, url = str(settings.out.resolve()), settings.store
        problems: dict[str, Any] = client.run(check_out, out, url)
        for worker, problem in sorted(problems.items()):
            if problem:
                shared = "" if url else " (OUT must be shared)"
                raise StorageError(f"Dask worker {worker}: {problem}{shared}")


def _chunks(jobs: Iterable[Job], settings: Settings) -> Iterator[list[Job]]:
    """The tasks: ``dask.shard_size`` jobs each, or, for a shard format, the jobs of one
    output shard each (rows k*S ... (k+1)*S-1), so that one worker writes each shard."""
    dataset = settings.dataset
    if not dataset.shards:
        return chunked(jobs, settings.dask.shard_size)
    size = dataset.samples_per_shard
    return (list(group) for _, group in itertools.groupby(jobs, lambda job: job.index // size))
