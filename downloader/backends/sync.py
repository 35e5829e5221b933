"""sync: one requests.Session, one job after another, thumbnails inline (``placement``)."""

from __future__ import annotations

from collections.abc import Iterable

from ..fetch import new_session
from ..jobs import Job
from ..placement import placement
from ..politeness import HostGate
from ..settings import Settings
from ..stop import StopToken
from ..work import handle_sync
from .base import Emit, finished
from .pools import sync_cpu_stage


class SyncBackend:
    name = "sync"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        gate = HostGate(settings.http.rate)
        with (
            sync_cpu_stage(settings, placement(settings, "sync")) as cpu,
            new_session(settings.http) as session,
        ):
            it = iter(jobs)
            while not stop.is_set() and (job := next(it, None)) is not None:
                result = handle_sync(session, job, settings, cpu, gate, stop)
                if finished(result, stop):
                    emit(result)
