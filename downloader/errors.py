"""Typed, picklable errors, each with a one-line message a user understands.

Per-URL failures never escape a backend: they become a ``Result`` whose ``error`` is
``str(exc)``. Only configuration problems (``ConfigError``) and bugs raise to the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The way on after a storage fault, in the words of a run (the CLI, the Python API); the
# service words its own (a job goes on with retry).
RESUME = "run the same command with --resume"


class DownloaderError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(DownloaderError):
    """Bad settings: a flag, a config file, an environment variable. Exit code 2."""


class FetchError(DownloaderError):
    """A URL could not be turned into image bytes, and trying again will not help."""

    attempts: int = 0  # set by the fetch shells: how many attempts were made


class RetryableFetchError(FetchError):
    """A transient failure (connection, timeout, 429, 5xx, truncated body).

    ``retry_after`` carries the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status

    def __reduce__(
        self,
    ) -> tuple[type[RetryableFetchError], tuple[str, float | None, int | None]]:
        return (type(self), (str(self), self.retry_after, self.status))


class InvalidImageError(FetchError):
    """The body is not an image we accept: wrong type, corrupt, too large, or a bomb."""


class StorageError(DownloaderError):
    """OUT cannot be written."""


class ClusterUnreachableError(DownloaderError):
    """The Dask scheduler named by ``dask.scheduler`` cannot be reached: a network
    problem (or a wrong address), not the output folder's. Exit code 2."""


class OutputInUseError(StorageError):
    """Another run holds OUT's lock (``OUT/.downloader.lock``). ``pid``: that run's, when
    it could be read."""

    def __init__(self, out: object, pid: int | None = None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"{out} is in use by another download ({who})")
        self.out = str(out)
        self.pid = pid

    def __reduce__(self) -> tuple[type[OutputInUseError], tuple[str, int | None]]:
        return (type(self), (self.out, self.pid))


@dataclass(frozen=True)
class StorageFault:
    """Why OUT cannot be written any more, and what the user does about it, kept apart so
    that each front end words the way on after the fix in its own terms (``then``)."""

    cause: str  # "no space left on device writing pic"
    fix: str = ""  # "free some space"; empty when going on is all there is to do

    def then(self, way_on: str) -> str:
        """The one line: ``cause: fix, then way_on`` (``cause: way_on`` without a fix)."""
        return f"{self.cause}: {self.fix}, then {way_on}" if self.fix else f"{self.cause}: {way_on}"


class StorageFaultError(StorageError):
    """OUT stopped being writable mid-run (no space, quota, read-only, I/O error, the
    folder gone): every later image would fail as well, so the run stopped. ``fault``
    names the cause and the fix; the message adds a run's way on (``RESUME``). ``lost``:
    results whose manifest lines could not be written (their files were removed:
    ``--resume`` fetches them again). ``report``: the run's complete report, when
    ``download()`` raises it."""

    def __init__(self, fault: StorageFault, lost: tuple[Any, ...] = (), report: Any = None) -> None:
        super().__init__(fault.then(RESUME))
        self.fault = fault
        self.lost = lost
        self.report = report

    def __reduce__(
        self,
    ) -> tuple[type[StorageFaultError], tuple[StorageFault, tuple[Any, ...], Any]]:
        return (type(self), (self.fault, self.lost, self.report))
