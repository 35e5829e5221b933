"""Shared plumbing for the benchmarks: one built-in image server in its own process, and
timing a whole command as a process tree (wall, CPU, peak RSS).

Not a test and not run by CI. Linux only (prctl, /proc, wait4).

Why not just ``resource.getrusage(RUSAGE_CHILDREN)`` around ``subprocess.run``:

* ``ru_maxrss`` of RUSAGE_CHILDREN is a running maximum over every child ever reaped, so
  after one big run every later run would report the same peak. ``os.wait4`` gives the
  usage of exactly one child (and the descendants it reaped itself).
* ``download`` starts its thumbnail workers from a multiprocessing *forkserver*. The
  forkserver outlives the ``download`` process by a moment and is then re-parented, so its
  CPU time (and its workers') would never reach us. This process makes itself a *child
  subreaper* (``PR_SET_CHILD_SUBREAPER``): orphaned descendants are re-parented to us and
  we reap them with ``os.wait4`` too, so their CPU seconds are counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
JPEG_MAGIC = b"\xff\xd8\xff"
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4). False when that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------- /proc


def _ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process we can see."""
    parents: dict[int, int] = {}
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


def descendants(root: int, parents: dict[int, int] | None = None) -> list[int]:
    parents = _ppid_map() if parents is None else parents
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (e.g. the image server)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _hwm_kb(pid: int) -> int:
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
    """Every ``interval`` s: the summed RSS of ``root`` and its descendants (peak kept), and
    ``root``'s own VmHWM (its peak RSS; the last reading before it exits is kept)."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.root, self.interval = root, interval
        self.tree_peak_kb = 0
        self.root_hwm_kb = 0
        self.max_procs = 0
        self.root_series: list[tuple[float, int, int]] = []  # (s since start, RSS, HWM KiB)
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self._halt.is_set():
            root_kb, hwm_kb = _rss_kb(self.root), _hwm_kb(self.root)
            if root_kb:
                self.root_series.append((time.perf_counter() - start, root_kb, hwm_kb))
            pids = [self.root, *descendants(self.root)]
            total = sum(_rss_kb(pid) for pid in pids)
            self.tree_peak_kb = max(self.tree_peak_kb, total)
            self.max_procs = max(self.max_procs, len(pids))
            self.root_hwm_kb = max(self.root_hwm_kb, hwm_kb)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# ---------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    returncode: int
    wall_s: float
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
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 900.0,
    ignore: Sequence[int] = (),
) -> Measured:
    """Run ``cmd`` to completion; wall time is from spawn to the command's exit. ``ignore``:
    children of ours that are not part of the run (the image server)."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        killer = threading.Timer(timeout_s, _kill_group, (proc.pid,))
        killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        killer.cancel()
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    maxrss = usage.ru_maxrss
    orphans = 0
    for orphan in _reap_orphans(set(ignore)):
        cpu += orphan.ru_utime + orphan.ru_stime
        maxrss = max(maxrss, orphan.ru_maxrss)
        orphans += 1
    tail = log_path.read_text(errors="replace")[-2000:]
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=cpu,
        maxrss_mb=maxrss / 1024,
        main_rss_mb=sampler.root_hwm_kb / 1024,
        tree_rss_mb=sampler.tree_peak_kb / 1024,
        procs=sampler.max_procs,
        orphans=orphans,
        log_tail=tail,
        root_series=sampler.root_series,
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reap_orphans(ignore: set[int], grace_s: float = 10.0) -> Iterator[os.struct_rusage]:
    """Wait for every child of ours (adopted orphans included) except ``ignore``."""
    me = os.getpid()
    deadline = time.monotonic() + grace_s
    while True:
        pending = [pid for pid, ppid in _ppid_map().items() if ppid == me and pid not in ignore]
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


# ---------------------------------------------------------------------------- the server


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def image_server(
    download: str,
    latency_ms: float = 0.0,
    pool_size: int = 40,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``download serve --port 0`` in a process of its own; the port is read from the line it
    prints once it listens ("serving ... on http://127.0.0.1:PORT ...")."""
    log_dir = log_dir or Path(tempfile.gettempdir())
    log = log_dir / "server.log"
    cmd = [download, "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--latency-ms", f"{latency_ms:g}", "--pool-size", str(pool_size)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            match = re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if match:
                port = int(match.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"image server did not start: {log.read_text()[-500:]}")
            else:
                time.sleep(0.05)
        yield Server(proc, port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def warm(server: Server, width: int, height: int, pool_size: int) -> None:
    """Render every photo of the pool once, so no tool pays for the server's cache."""
    for photo in range(pool_size):
        url = f"{server.base_url}/cache/resized/{photo}_c_{width}_{height}_nofilter.jpg"
        with urllib.request.urlopen(url, timeout=60) as resp:
            body = resp.read()
        if not body.startswith(JPEG_MAGIC):
            raise RuntimeError(f"warm-up: {url} did not return a JPEG")


# ---------------------------------------------------------------------------- the code measured

REPO = Path(__file__).resolve().parents[1]


def pin_package(dest: Path) -> dict[str, str]:
    """Copy the working tree's ``downloader/`` to ``dest`` and return the environment that
    makes ``download`` (an editable install) import that copy instead: commits or edits that
    land in the working tree mid-benchmark then cannot change what is measured. PYTHONPATH
    comes before the editable finder, and the forkserver inherits the parent's sys.path."""
    shutil.copytree(
        REPO / "downloader", dest / "downloader", ignore=shutil.ignore_patterns("__pycache__")
    )
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(dest) + (os.pathsep + old if old else "")}


def code_version() -> str:
    """``git describe``-like: HEAD's short hash, plus "+dirty" when downloader/ has edits."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "downloader")
    return head + ("+dirty" if dirty else "")


# ---------------------------------------------------------------------------- misc


def find_tool(name: str, explicit: str | None = None) -> str | None:
    """``explicit``, else ``name`` beside this interpreter (a venv's bin/), else on PATH."""
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def good_image(path: Path) -> bool:
    """Non-empty and starts like a JPEG (every tool here saves the server's JPEGs)."""
    try:
        with open(path, "rb") as f:
            return f.read(3) == JPEG_MAGIC
    except OSError:
        return False


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            first, *rest = cells
            parts = [first.ljust(widths[0])]
            parts += [cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True)]
            return "| " + " | ".join(parts) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(self.columns), rule, *(line(row) for row in self.rows)])


def machine_info() -> dict[str, object]:
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }
