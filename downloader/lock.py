"""One run per output folder: ``OUT/.downloader.lock``, held with ``flock`` for a run's life
(and one service per data folder: ``DATA/service.lock``, the same lock under another name).

The kernel drops an ``flock`` when its process dies, however it dies, so ``kill -9`` leaves
no stale lock to clean up. The file holds the pid of the run that has it, for the message
a second run prints. It is never removed: removing it would let two runs lock two
different files under one name (one opened the old file just before it went away).

The lock file is held open read-only where it can be, so that it never keeps a file system
from being remounted read-only. On NFS (dask's shared OUT) Linux carries ``flock`` out as
a POSIX write lock, which needs a descriptor open for writing: there it is held read-write.

A URL OUT (``stores.FsspecStore``) has no flock: its lock is an object,
``PREFIX/.downloader.lock``, created with a conditional PUT (``If-None-Match: *``: of two
runs, one gets it) and naming its run's host, pid and local state folder; the run removes
it when it ends. After ``kill -9`` it stays: a run on the same host takes it over when no
process holds the flock of the state folder it names (the run that left it is gone), with
``If-Match`` on its ETag, so that two runs cannot both take it over. One left by another
host is refused, naming the object to delete once that run is known to be gone. Stores
without conditional writes (all but S3) check, then write: one run per OUT is the rule
there too, but two runs started in the same instant are not told apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import OutputInUseError, StorageError

if TYPE_CHECKING:
    from .stores import FsspecStore

LOCK = ".downloader.lock"
LOCK_OBJECT = LOCK  # a URL OUT's, under the same name
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


# ---------------------------------------------------------------------------- a URL OUT


class RemoteLock:
    """One run per URL OUT: the lock object (see the module's docstring)."""

    def __init__(self, store: FsspecStore, state: Path) -> None:
        self.store, self.state = store, state.resolve()
        self.body = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "state": str(self.state)}
        ).encode()

    def __enter__(self) -> RemoteLock:
        store = self.store
        try:
            try:
                store.create(LOCK_OBJECT, self.body)
                return self
            except FileExistsError:
                pass
            held, tag = store.tagged(LOCK_OBJECT)
        except Exception as exc:  # each store library raises its own kinds
            raise StorageError(store.why(exc, f"cannot lock {store.where}")) from None
        owner = _owner(held)
        if held is not None and not self._stale(owner):
            raise RemoteInUseError(store.where, owner.get("pid"), owner.get("host", "?"))
        try:
            store.replace(LOCK_OBJECT, self.body, tag)
        except Exception as exc:
            now = self._current()
            if now == self.body:
                return self
            if now is not None and now != held:  # another run took it over first
                taker = _owner(now)
                who = taker.get("pid"), taker.get("host", "?")
                raise RemoteInUseError(store.where, *who) from None
            raise StorageError(store.why(exc, f"cannot lock {store.where}")) from None
        return self

    def _current(self) -> bytes | None:
        with contextlib.suppress(Exception):
            return self.store.tagged(LOCK_OBJECT)[0]
        return None

    def _stale(self, owner: dict[str, Any]) -> bool:
        """Whether the run that left the lock is gone: it ran on this host, and no process
        holds the flock of its state folder (ours: we hold it, so it is not that run's)."""
        if owner.get("host") != socket.gethostname() or not owner.get("state"):
            return False
        state = Path(str(owner["state"]))
        return state == self.state or holder(state) is None

    def __exit__(self, *exc: object) -> None:
        self.store.remove(LOCK_OBJECT)


def _owner(data: bytes | None) -> dict[str, Any]:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        held = json.loads(data or b"")
        if isinstance(held, dict):
            return held
    return {}


class RemoteInUseError(OutputInUseError):
    """Another run holds a URL OUT's lock object."""

    def __init__(self, out: object, pid: int | None = None, host: str = "?") -> None:
        super().__init__(out, pid)
        self.host = host
        who = f"pid {pid} on {host}" if pid else f"on {host}"
        self.args = (
            f"{out} is in use by another download ({who}); if that run is gone, "
            f"delete {out}/{LOCK_OBJECT}",
        )

    def __reduce__(self) -> tuple[type[RemoteInUseError], tuple[str, int | None, str]]:  # type: ignore[override]
        return (type(self), (self.out, self.pid, self.host))
