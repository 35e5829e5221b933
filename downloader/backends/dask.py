"""dask: the asyncio pipeline, one shard of jobs at a time, on a Dask cluster.

Without ``dask.scheduler`` a ``LocalCluster`` of worker processes sized to the machine is
started; with it, the client connects to ``tcp://HOST:8786``. Each shard (``dask.shard_size``
jobs) runs fetch, validate, thumbnail and atomic write on a worker and returns its Results;
only the client writes the manifest, so it keeps exactly one line per index. When a worker
dies mid-shard Dask runs the shard again elsewhere; files already written are recognised by
their content (``storage.write_files`` skips identical bytes) instead of written twice.

OUT must be a folder every worker can write (a shared file system): each worker proves it
before any work is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, as_completed

from ..children import cpu_count
from ..errors import ClusterUnreachableError, StorageError
from ..jobs import Job
from ..placement import placement
from ..result import Result
from ..settings import Settings
from ..stop import StopToken
from ..storage import check_writable
from .base import Emit
from .pools import chunked

CONNECT_TIMEOUT_S = 10.0  # how long to keep trying a scheduler that does not answer


def run_shard(jobs: list[Job], settings: Settings) -> list[Result]:
    """On a worker: the asyncio pipeline over one shard, its CPU stage and its writes in
    threads (``placement``: a worker may not start a process pool, and OUT is a shared
    file system)."""
    from .aio import run_pipeline

    results: list[Result] = []
    stop = StopToken()  # a storage fault stops the shard at once: no fetching in vain

    def emit(result: Result) -> None:
        results.append(result)
        if result.fault:
            stop.set(result.fault.cause)

    asyncio.run(run_pipeline(jobs, settings, emit, stop, placement(settings, "dask")))
    return results


def check_out(out: str) -> str | None:
    """On a worker: why it cannot write OUT, or None."""
    try:
        check_writable(Path(out))
    except StorageError as exc:
        return str(exc)
    return None


class DaskBackend:
    name = "dask"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        """A stop sends no more shards; the shards already on a worker finish (each request
        bounded by its deadline) and all their results are recorded."""
        with self._client(settings) as client:
            self._check_workers(client, settings.out)
            in_flight = 2 * max(1, sum(client.nthreads().values()))
            shards = chunked(jobs, settings.dask.shard_size)
            pending = as_completed()
            for first in itertools.islice(shards, 0 if stop.is_set() else in_flight):
                pending.add(client.submit(run_shard, first, settings, pure=False))
            for future in pending:
                for result in future.result():
                    emit(result)
                future.release()
                shard = None if stop.is_set() else next(shards, None)
                if shard is not None:
                    pending.add(client.submit(run_shard, shard, settings, pure=False))

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
    def _check_workers(client: Client, out: Path) -> None:
        problems: dict[str, Any] = client.run(check_out, str(out.resolve()))
        for worker, problem in sorted(problems.items()):
            if problem:
                raise StorageError(f"Dask worker {worker}: {problem} (OUT must be shared)")
