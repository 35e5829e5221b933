"""What a command costs as a whole process tree: wall time, CPU seconds and peak memory of
the command *and every process it starts*. Used by ``download compare`` and the benchmarks.

Linux (``/proc``, ``prctl``, ``os.wait4``); elsewhere CPU falls back to what ``wait4``
reports and the tree's memory reads 0.

Why not ``getrusage(RUSAGE_CHILDREN)`` around ``subprocess.run``:

* Pool workers started through a multiprocessing *forkserver* (the asyncio backend's
  thumbnail pool, hybrid's workers) are children of the forkserver, not of the run. The
  forkserver can outlive the run by a moment and is then re-parented, so its CPU time and
  its workers' would never reach us. The measuring process makes itself a *child
  subreaper* (``PR_SET_CHILD_SUBREAPER``): orphaned descendants are re-parented to it and
  reaped with ``os.wait4`` too, so every CPU second is counted, start-up included.
* ``ru_maxrss`` is the peak of the largest *single* process, and for RUSAGE_CHILDREN a
  running maximum over every child ever reaped. The tree's memory is the sum of its
  processes' RSS, sampled while it runs.
* The machine's busy time from ``/proc/stat`` would count every other job on a shared
  machine; the process tree counts only the run (the image server is a process of its own
  and is left out).

``python -m downloader.usage --report FILE -- CMD ...`` runs CMD that way and writes the
numbers to FILE as JSON: a process of its own, so the caller does not become a subreaper.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4). False when that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------- /proc


def ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process we can see."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # comm may contain spaces and parentheses: fields start after the last ')'.
            rest = stat[stat.rfind(b")") + 2 :].split()
            parents[int(entry.name)] = int(rest[1])
    return parents


def descendants(roots: Iterable[int], parents: dict[int, int] | None = None) -> list[int]:
    """Every process below ``roots`` (the roots themselves not included)."""
    parents = ppid_map() if parents is None else parents
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = list(roots)
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def children_of(pid: int) -> set[int]:
    return {child for child, parent in ppid_map().items() if parent == pid}


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (e.g. the image server)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def hwm_kb(pid: int) -> int:
    """VmHWM: the peak RSS of one process so far."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Every ``interval`` s: the summed RSS of ``root``, its descendants and the orphans of
    the tree adopted by this process (children of ours not in ``ignore``), peak kept; and
    ``root``'s own VmHWM (its peak RSS; the last reading before it exits is kept)."""

    def __init__(self, root: int, interval: float = 0.1, ignore: Iterable[int] = ()) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.root, self.interval = root, interval
        self.ignore = {*ignore, root}
        self.tree_peak_kb = 0
        self.root_hwm_kb = 0
        self.max_procs = 0
        self.root_series: list[tuple[float, int, int]] = []  # (s since start, RSS, HWM KiB)
        self._halt = threading.Event()

    def run(self) -> None:
        start, me = time.perf_counter(), os.getpid()
        while not self._halt.is_set():
            root_kb, hwm = rss_kb(self.root), hwm_kb(self.root)
            if root_kb:
                self.root_series.append((time.perf_counter() - start, root_kb, hwm))
            parents = ppid_map()
            adopted = [pid for pid, ppid in parents.items() if ppid == me]
            tops = [self.root, *(pid for pid in adopted if pid not in self.ignore)]
            pids = [*tops, *descendants(tops, parents)]
            self.tree_peak_kb = max(self.tree_peak_kb, sum(rss_kb(pid) for pid in pids))
            self.max_procs = max(self.max_procs, len(pids))
            self.root_hwm_kb = max(self.root_hwm_kb, hwm)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# ---------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    returncode: int
    wall_s: float  # from spawn to the command's exit
    cpu_s: float  # user + system of the whole tree (the command and all its descendants)
    maxrss_mb: float  # largest single process of the tree (wait4 ru_maxrss)
    main_rss_mb: float  # the command's own process: its VmHWM, sampled
    tree_rss_mb: float  # peak of the summed RSS of the tree, sampled every 0.1 s
    procs: int  # most processes seen at once in the tree
    orphans: int  # descendants that outlived the command and were reaped here
    log_tail: str = ""
    root_series: list[tuple[float, int, int]] = field(default_factory=list, repr=False)


def measure(
    cmd: Sequence[str],
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 900.0,
    ignore: Sequence[int] = (),
    started: Callable[[int], None] | None = None,
) -> Measured:
    """Run ``cmd`` to completion and measure its whole process tree.

    ``log_path``: where its stdout and stderr go (None: ours). ``ignore``: children of ours
    that are not part of the run (any child we already have is left alone as well).
    It runs in a session of its own: the timeout ends its whole process group, and the
    scheduler gives it its own share of the CPU (Linux's autogroup shares CPU time between
    sessions), not one split with the image server or the measuring process. ``started``
    is told its pid (e.g. to forward a Ctrl-C, which a terminal no longer sends it)."""
    ignored = {*ignore, *children_of(os.getpid())}
    with open(log_path, "wb") if log_path else contextlib.nullcontext() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            env=env,
            start_new_session=True,
        )
        sampler = TreeSampler(proc.pid, ignore=ignored)
        sampler.start()
        if started is not None:
            started(proc.pid)
        killer = threading.Timer(timeout_s, _kill_group, (proc.pid,))
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        killer.cancel()
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    orphans = list(_reap_orphans(ignored))
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=sum(u.ru_utime + u.ru_stime for u in (usage, *orphans)),
        maxrss_mb=max(u.ru_maxrss for u in (usage, *orphans)) / 1024,
        main_rss_mb=sampler.root_hwm_kb / 1024,
        tree_rss_mb=sampler.tree_peak_kb / 1024,
        procs=sampler.max_procs,
        orphans=len(orphans),
        log_tail=log_path.read_text(errors="replace")[-2000:] if log_path else "",
        root_series=sampler.root_series,
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reap_orphans(ignore: set[int], grace_s: float = 10.0) -> Iterator[resource.struct_rusage]:
    """Wait for every child of ours (adopted orphans included) except ``ignore``."""
    me = os.getpid()
    deadline = time.monotonic() + grace_s
    while True:
        pending = [pid for pid in children_of(me) if pid not in ignore]
        if not pending:
            return
        for pid in pending:
            with contextlib.suppress(ChildProcessError):
                got, _, usage = os.wait4(pid, os.WNOHANG)
                if got:
                    yield usage
        if time.monotonic() > deadline:  # stragglers: end them, count what they used
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace_s
        time.sleep(0.01)


# ---------------------------------------------------------------------------- the wrapper


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m downloader.usage --report FILE -- CMD ...``: run CMD (with our stdin,
    stdout and stderr; a Ctrl-C or SIGTERM we get is passed on to it) and write what its
    whole tree cost to FILE as JSON. Exits with CMD's exit code."""
    parser = argparse.ArgumentParser(prog="python -m downloader.usage")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    become_subreaper()
    group: list[int] = []

    def pass_on(signum: int, frame: object) -> None:
        # The command stops in its own way; this process lives on to reap and report.
        for pid in group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, pass_on)
    measured = measure(cmd, timeout_s=args.timeout, started=group.append)
    numbers = dataclasses.asdict(measured)
    del numbers["root_series"], numbers["log_tail"]
    partial = args.report.with_name(args.report.name + ".part")
    partial.write_text(json.dumps(numbers))
    os.replace(partial, args.report)
    return measured.returncode if measured.returncode >= 0 else 128 - measured.returncode


if __name__ == "__main__":
    sys.exit(main())
