"""What hybrid's parent and its worker processes tell each other: small frozen records,
pickled over a pipe. Each kind is its own type, so a receiver matches on the type, never
on a string, a tuple's length or a list's position."""

from __future__ import annotations

from dataclasses import dataclass

from ..jobs import Job
from ..result import Result

# ---------------------------------------------------------------------------- parent -> worker


@dataclass(frozen=True, slots=True)
class Jobs:
    """Jobs to run; the parent sends them as the worker has room."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True, slots=True)
class NoMoreJobs:
    """Every job went out: finish what you hold, then say ``Done``."""


@dataclass(frozen=True, slots=True)
class Stop:
    """The run was stopped: cancel what is in flight, send what finished, say ``Done``."""


# ---------------------------------------------------------------------------- both ways


@dataclass(frozen=True, slots=True)
class Pause:
    """``host`` asked to be left alone (429, Retry-After) until ``until`` (CLOCK_MONOTONIC,
    which is machine-wide): a worker tells the parent, the parent tells the others."""

    host: str
    until: float


# ---------------------------------------------------------------------------- worker -> parent


@dataclass(frozen=True, slots=True)
class Results:
    """Finished jobs, a batch at a time (their files are already on disk)."""

    results: tuple[Result, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker hit a bug; the parent fails the jobs it held with ``reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    """Every result was sent; the worker exits."""


ToWorker = Jobs | NoMoreJobs | Stop | Pause
ToParent = Results | Pause | Done | Failed
