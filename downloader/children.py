"""Child processes of a run (pool workers, hybrid's workers, the built-in server): how
they start, what they import first, how they leave Ctrl-C to the parent and exit with it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from pathlib import Path

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


def cpu_count(root: Path = Path("/")) -> int:
    """The cores this process may use, for every default that means "one per core": its
    affinity mask, capped by its cgroup's CPU quota (``cpu_quota``), at least 1. In a
    container run with ``--cpus=2`` on a 32-core host, that is 2, not 32. ``root``: where
    ``/proc`` and ``/sys`` are (tests give a tree of their own)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, cores if quota is None else min(cores, quota))


def cpu_quota(root: Path = Path("/")) -> int | None:
    """This process's CPU quota in whole cores (quota over period, rounded up), or None
    when it has none. Its cgroups are named in ``/proc/self/cgroup`` and read under
    ``/sys/fs/cgroup``: v2's ``cpu.max`` ("quota period" or "max"), v1's
    ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1: none); the tightest of the cgroup
    and its ancestors counts, as the kernel enforces each of them."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    base = root / "sys/fs/cgroup"
    quotas: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:  # v2: one hierarchy, at base or, in hybrid layouts, base/unified
            unified = base if (base / "cgroup.controllers").exists() else base / "unified"
            quotas += _quotas_up(unified, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            mount = base / controllers
            quotas += _quotas_up(mount if mount.is_dir() else base / "cpu", path, _v1_quota)
    return min(quotas, default=None)


def _quotas_up(mount: Path, path: str, read: Callable[[Path], int | None]) -> list[int]:
    """The quotas of the cgroup at ``path`` and of each ancestor up to ``mount``. A path not
    under ``mount`` is a container's own cgroup seen from outside its namespace: there the
    mount itself is the process's cgroup."""
    here = mount / path.strip("/")
    if not here.is_dir():
        here = mount
    found = []
    while True:
        if (quota := read(here)) is not None:
            found.append(quota)
        if here == mount or mount not in here.parents:
            return found
        here = here.parent


def _v2_quota(folder: Path) -> int | None:
    fields = _read(folder / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _cores(fields[0], fields[1])


def _v1_quota(folder: Path) -> int | None:
    return _cores(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))


def _cores(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return -(-q // p) if q > 0 and p > 0 else None  # rounded up: 1.5 cores is 2 workers


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
