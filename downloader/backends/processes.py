"""processes: a process pool; each worker keeps its own requests.Session and makes its own
thumbnails. Jobs travel in small chunks to amortise the pickling round trip.

Worker count is ``http.concurrency`` (capped at ``MAX_WORKERS``): each process waits on one
download at a time, so it takes as many processes as connections to overlap slow I/O.
That is the cost this backend exists to show: 10 kitchens, 10 cooks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

import requests

from ..children import child_init, mp_context
from ..errors import StorageFault
from ..fetch import new_session
from ..jobs import Job
from ..placement import Placement, placement
from ..politeness import HostGate
from ..result import Result
from ..settings import Settings
from ..stop import StopToken
from ..work import CpuStage, handle_sync
from .base import Emit
from .pools import bounded_map, chunked, sync_cpu_stage

MAX_WORKERS = 64
_session: requests.Session | None = None
_settings: Settings | None = None


_gate: HostGate | None = None
_cpu: CpuStage | None = None
_held = contextlib.ExitStack()  # what the worker keeps for its life (a CPU-stage pool)
_fault: StorageFault | None = None  # a storage fault this worker hit: it runs no more jobs


def _init_worker(settings: Settings, where: Placement, workers: int, parent: int) -> None:
    global _session, _settings, _gate, _cpu
    child_init(parent)
    _settings = settings
    _session = new_session(settings.http)
    _gate = HostGate(settings.http.rate / workers)  # each worker gets its share of the rate
    _cpu = _held.enter_context(sync_cpu_stage(settings, where))


def _run_chunk(jobs: list[Job]) -> list[Result]:
    """The chunk's Results; after a storage fault, none for the jobs it did not run (the
    run is stopping, and ``--resume`` fetches them), rather than fetch them in vain."""
    global _fault
    assert _session is not None and _settings is not None, "worker not initialised"
    assert _cpu is not None, "worker not initialised"
    results = []
    for job in jobs:
        if _fault is not None:
            break
        results.append(handle_sync(_session, job, _settings, _cpu, _gate))
        _fault = results[-1].fault
    return results


class ProcessesBackend:
    name = "processes"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        workers = min(settings.http.concurrency, MAX_WORKERS)
        # Small chunks keep the progress bar and load balance smooth; >1 halves IPC turns.
        chunk = 1 if settings.count <= 4 * workers else 2
        with ProcessPoolExecutor(
            workers,
            mp_context=mp_context(),
            initializer=_init_worker,
            initargs=(settings, placement(settings, "processes"), workers, os.getpid()),
        ) as pool:
            # A stop cancels the chunks not yet started; the workers finish theirs (each
            # request bounded by its deadline), and every result they return is recorded.
            for results in bounded_map(pool, _run_chunk, chunked(jobs, chunk), 2 * workers, stop):
                for result in results:
                    emit(result)
