"""The Backend Protocol: a way of scheduling the shared per-job steps in ``work``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ..jobs import Job
from ..result import Result
from ..settings import Settings
from ..stop import StopToken

Emit = Callable[[Result], None]


class Backend(Protocol):
    """A way of scheduling the per-job steps. A backend may also define
    ``prepare(settings)``, which the pipeline calls before anything else (to start worker
    processes while it reads manifests and opens OUT)."""

    name: str

    def run(self, jobs: Iterable[Job], settings: Settings, emit: Emit, stop: StopToken) -> None:
        """Run every job and call ``emit`` exactly once per finished job, in the calling
        thread.

        ``jobs`` is lazy and may be long: a backend keeps only O(concurrency) jobs in flight.
        Per-job failures are emitted as failed Results; only bugs raise. Once ``stop`` is
        set (from any thread, or a signal handler), the backend takes no more jobs, cancels
        or drains what is in flight, emits what finished, and returns.
        """
        ...


def finished(result: Result, stop: StopToken) -> bool:
    """Whether to emit ``result`` of a job the stop may have cut short: a failure after a
    stop may be the stop's doing, so it is not recorded (``--resume`` runs it again)."""
    return result.ok or not stop.is_set()
