"""The Backend Protocol: a way of scheduling the shared per-job steps in ``work``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ..jobs import Job
from ..result import Result
from ..settings import Settings

Emit = Callable[[Result], None]


class Backend(Protocol):
    """A way of scheduling the per-job steps. A backend may also define
    ``prepare(settings)``, which the pipeline calls before anything else (to start worker
    processes while it reads manifests and opens OUT)."""

    name: str

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit) -> None:
        """Run every job and call ``emit`` exactly once per job, in the calling thread.

        ``jobs`` is lazy and may be long: a backend keeps only O(concurrency) jobs in flight.
        Per-job failures are emitted as failed Results; only bugs raise.
        """
        ...
