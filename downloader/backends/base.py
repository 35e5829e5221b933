"""The Backend Protocol: a way of scheduling the shared per-job steps in ``work``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..jobs import Job
from ..result import Result

if TYPE_CHECKING:  # the settings import the backend registry, which imports this module
    from ..settings import Settings

Emit = Callable[[Result], None]


def holding_interrupts(emit: Emit) -> contextlib.AbstractContextManager[Any]:
    """A scope in which Ctrl-C waits, if ``emit`` is the pipeline's (it carries ``held``).

    ``emit`` itself holds a Ctrl-C until the result is recorded. A backend that takes a
    result off a queue just before emitting it wraps both in this scope, so a Ctrl-C that
    lands between the two cannot drop a result whose files are on disk.
    """
    held = getattr(emit, "held", None)
    return held() if held is not None else contextlib.nullcontext()


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
