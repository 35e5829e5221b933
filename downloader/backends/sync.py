"""sync: one requests.Session, one job after another, thumbnails inline."""

from __future__ import annotations

from collections.abc import Iterable

from ..fetch import new_session
from ..jobs import Job
from ..politeness import HostGate
from ..settings import Settings
from ..stop import StopToken
from ..work import handle_sync
from .base import Emit, finished


class SyncBackend:
    name = "sync"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        gate = HostGate(settings.http.rate)
        with new_session(settings.http) as session:
            it = iter(jobs)
            while not stop.is_set() and (job := next(it, None)) is not None:
                result = handle_sync(session, job, settings, gate=gate, stop=stop)
                if finished(result, stop):
                    emit(result)
