"""threads: a thread pool, one requests.Session per thread.

Thumbnails run in the worker thread (Pillow releases the GIL while it decodes and
resizes), or in a process pool with ``thumbnails.executor = "process"`` (``placement``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import requests

from ..fetch import new_session
from ..jobs import Job
from ..placement import placement
from ..politeness import HostGate
from ..result import Result
from ..settings import Settings
from ..stop import StopToken
from ..work import handle_sync
from .base import Emit, finished
from .pools import bounded_map, sync_cpu_stage


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

        with sync_cpu_stage(settings, placement(settings, "threads")) as cpu:
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
