"""The Backend Protocol: a way of scheduling the shared per-job steps in ``work``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ..jobs import Job
from ..result import Result
from ..settings import Settings

Emit = Callable[[Result], None]


class Backend(Protocol):
    name: str

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit) -> None:
        """Run every job and call ``emit`` exactly once per job, in the calling thread.

        ``jobs`` is lazy and may be long: a backend keeps only O(concurrency) jobs in flight.
        Per-job failures are emitted as failed Results; only bugs raise.
        """
        ...
