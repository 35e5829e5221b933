"""sync: one requests.Session, one job after another, thumbnails inline."""

from __future__ import annotations

from collections.abc import Iterable

from ..fetch import new_session
from ..jobs import Job
from ..politeness import HostGate
from ..settings import Settings
from ..work import handle_sync
from .base import Emit


class SyncBackend:
    name = "sync"

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit) -> None:
        gate = HostGate(settings.http.rate)
        with new_session(settings.http) as session:
            for job in jobs:
                emit(handle_sync(session, job, settings, gate=gate))
