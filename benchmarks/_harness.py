"""Shared plumbing for the benchmarks: one built-in image server in its own process, and
timing a whole command as a process tree (wall, CPU, peak RSS), which lives in
``downloader.usage`` so that ``download compare`` counts the same way.

Not a test and not run by CI. Linux only (prctl, /proc, wait4).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

JPEG_MAGIC = b"\xff\xd8\xff"


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
