"""Child processes of a run (pool workers, hybrid's workers, the built-in server): how
they start, what they import first, how they leave Ctrl-C to the parent and exit with it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.context import BaseContext

PRELOAD = ("downloader._detach", "downloader.work")


def mp_context(preload: tuple[str, ...] = PRELOAD) -> BaseContext:
    """forkserver where there is one: children fork from a clean, single-threaded server
    that has already imported the heavy modules, instead of forking a parent that runs
    threads (progress bar, test servers) or paying a full interpreter start (spawn).
    ``preload`` counts only for the first call: one forkserver serves the process."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


def start_forkserver(preload: tuple[str, ...] = PRELOAD) -> None:
    """Start the forkserver now, so that it imports ``preload`` while this process is
    still busy with its own set-up, rather than when the first worker is asked for."""
    if mp_context(preload).get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def child_init(parent_pid: int) -> None:
    """Set up a child process (pool worker, local server) of the run in ``parent_pid``.

    Ctrl-C is left to the parent, which stops the run in order (a terminal sends SIGINT to
    the whole process group). And the child exits when the parent is gone: pool workers
    hold both ends of their call queue, so a parent killed with -9 would otherwise leave
    them (and the forkserver) waiting forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # pragma: no cover - pid reused by another user
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def reap_forkserver() -> None:
    """Stop and wait for the forkserver, once no pool is left. Pool workers are its
    children, so only then do their CPU time and peak memory reach this process's
    RUSAGE_CHILDREN (compare's numbers would otherwise leave them out)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
