"""threads: a thread pool, one requests.Session per thread.

Thumbnails run in the worker thread (Pillow releases the GIL while it decodes and
resizes) unless ``thumbnails.executor = "process"``, which sends them to a process pool.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor

import requests

from ..fetch import new_session
from ..jobs import Job
from ..politeness import HostGate
from ..result import Result
from ..settings import Settings
from ..stop import StopToken
from ..thumbnails import ImageInfo
from ..work import CpuStage, cpu_stage, handle_sync
from .base import Emit, finished
from .pools import bounded_map, cpu_executor


class ThreadsBackend:
    name = "threads"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        local = threading.local()
        sessions: list[requests.Session] = []
        lock = threading.Lock()

        def session() -> requests.Session:
            current: requests.Session | None = getattr(local, "session", None)
            if current is None:
                current = local.session = new_session(settings.http)
                with lock:
                    sessions.append(current)
            return current

        # Threads already are a thread pool: only a process pool is worth adding.
        use_pool = settings.stage_executor == "process"
        with cpu_executor("process") if use_pool else contextlib.nullcontext() as pool:
            cpu: CpuStage | None = None
            if pool is not None:
                cpu = functools.partial(_in_pool, pool, cpu_stage(settings))

            gate = HostGate(settings.http.rate)

            def work(job: Job) -> Result:
                return handle_sync(session(), job, settings, cpu, gate, stop)

            concurrency = settings.http.concurrency
            try:
                with ThreadPoolExecutor(concurrency, thread_name_prefix="download") as executor:
                    for result in bounded_map(executor, work, jobs, 2 * concurrency, stop):
                        if finished(result, stop):
                            emit(result)
            finally:
                for s in sessions:
                    s.close()


def _in_pool(pool: Executor, stage: CpuStage, data: bytes) -> ImageInfo:
    """Run the CPU stage in ``pool`` and wait for it (this download thread has nothing
    else to do meanwhile)."""
    return pool.submit(stage, data).result()
