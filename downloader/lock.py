"""One run per output folder: ``OUT/.downloader.lock``, held with ``flock`` for a run's life
(and one service per data folder: ``DATA/service.lock``, the same lock under another name).

The kernel drops an ``flock`` when its process dies, however it dies, so ``kill -9`` leaves
no stale lock to clean up. The file holds the pid of the run that has it, for the message
a second run prints. It is never removed: removing it would let two runs lock two
different files under one name (one opened the old file just before it went away).

The lock file is held open read-only where it can be, so that it never keeps a file system
from being remounted read-only. On NFS (dask's shared OUT) Linux carries ``flock`` out as
a POSIX write lock, which needs a descriptor open for writing: there it is held read-write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from .errors import OutputInUseError, StorageError

LOCK = ".downloader.lock"
_PID_WAIT_S = 0.2  # a run that has just locked writes its pid right after: wait that long


class OutputLock:
    """``with OutputLock(out):`` creates OUT if needed and holds its lock, or raises
    ``OutputInUseError`` at once (nothing in OUT touched) when another run holds it.
    A second ``OutputLock`` on the same OUT in the same process is refused as well.
    ``name``: the lock file's; ``what``: the folder, as messages name it."""

    def __init__(self, out: Path, name: str = LOCK, what: str = "output folder") -> None:
        self.out = out
        self.path = out / name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise StorageError(f"{self.what} {out} exists and is not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
            # Held read-only: a file open for writing would keep the file system from
            # being remounted read-only (EBUSY) for the run's whole life.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(
                f"cannot write to {self.what} {out}: {exc.strerror or exc}"
            ) from None
        self._fd = self._locked(fd)
        self._write_pid(f"{os.getpid()}\n")

    def release(self) -> None:
        if self._fd is not None:
            self._write_pid("")
            os.close(self._fd)  # drops the flock
            self._fd = None

    def _write_pid(self, text: str) -> None:
        with contextlib.suppress(OSError):  # the pid is only for a message
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)

    def _locked(self, fd: int) -> int:
        """``fd`` holding the lock exclusively, or a read-write descriptor of the same
        file where the file system wants one (NFS answers EBADF on a read-only one).
        Raises ``OutputInUseError`` or ``StorageError``, with the descriptor closed."""
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
                writable = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                os.close(fd)
                fd = writable
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputInUseError(self.out, pid) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {self.what} {self.out}: {exc.strerror}") from None
        return fd

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def holder(out: Path) -> int | None:
    """The pid of the run holding OUT's lock (0 if it has not written it yet), or None
    when no run holds it. Never creates anything."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    finally:
        os.close(fd)  # also drops the shared lock, if it was granted
    return None


def _read_pid(fd: int) -> int | None:
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(os.pread(fd, 32, 0).decode("ascii").strip())
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
