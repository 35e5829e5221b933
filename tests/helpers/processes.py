"""``download`` in this process (click's runner) or in child processes, with a scrubbed
environment, and the process trees a run leaves behind (pool workers, the forkserver)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner, Result

from downloader.cli import main as cli_main
from downloader.server import RunningServer, make_app, server_thread
from downloader.settings import ServerSettings

from .basics import REPO, wait_for
from .disk import complete_lines


def child_env(**extra: str) -> dict[str, str]:
    """The developer's environment without DOWNLOADER_* settings or proxies, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DOWNLOADER_") and not name.lower().endswith("_proxy")
    }
    return {**env, **extra}


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    """``download ARGS`` in this process, through click's test runner."""
    return CliRunner().invoke(cli_main, list(args), env=env, input=input)


def download_command() -> list[str]:
    script = Path(sys.executable).parent / "download"
    return [str(script)] if script.exists() else [sys.executable, str(REPO / "cli.py")]


def cli_args(
    backend: str, base_url: str, out: Path, count: int, concurrency: int = 4, query: str = ""
) -> list[str]:
    url = base_url + "/{width}/{height}?lock={i}" + query
    return [
        "--backend", backend, "-n", str(count), "--concurrency", str(concurrency),
        "--url", url, "--out", str(out), "-q",
    ]  # fmt: skip


@contextmanager
def launched(
    args: list[str],
    cwd: Path,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """``download ARGS`` in its own process group; killed (group and all) if still running."""
    proc = subprocess.Popen(
        [*(command or download_command()), *args],
        cwd=cwd,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Not read to EOF: after kill -9 the orphaned pool workers hold the pipes a while.
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*download_command(), *args],
        cwd=cwd,
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _proc_stat(int(entry.name))) is not None:
            children.setdefault(info[0], []).append(int(entry.name))
    return children


def grandchildren(pid: int) -> set[int]:
    """The processes two levels below ``pid``: pool workers, forked by the forkserver."""
    children = _children()
    return {g for child in children.get(pid, []) for g in children.get(child, [])}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (pool workers, the forkserver, resource tracker)."""
    children = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tree_after_lines(out: Path, lines: int, proc: subprocess.Popen[str]) -> set[int]:
    """Wait until OUT's manifest has ``lines`` complete lines (the run is under way), then
    return the run's process tree as it is at that moment."""
    wait_for(lambda: len(complete_lines(out)) >= lines, f"{lines} manifest lines", proc=proc)
    return descendants(proc.pid)


def alive(pid: int) -> bool:
    info = _proc_stat(pid)
    return info is not None and info[1] != "Z"  # a zombie has exited; init may not reap it


@dataclass(frozen=True)
class UnderWay:
    """A ``download`` process part-way through its run (see ``under_way``)."""

    server: RunningServer
    out: Path
    args: list[str]
    proc: subprocess.Popen[str]
    tree: set[int]  # its process tree once the first lines were written


@contextmanager
def under_way(
    backend: str, cwd: Path, count: int, lines: int, seed: int, concurrency: int = 4
) -> Iterator[UnderWay]:
    """``download`` of ``count`` images into ``cwd/pic`` from a built-in server slowed to
    30 ms an image (so the run lasts), once its manifest has ``lines`` complete lines."""
    out = cwd / "pic"
    with server_thread(make_app(ServerSettings(seed=seed, latency_ms=30))) as server:
        args = cli_args(backend, server.base_url, out, count, concurrency)
        with launched(args, cwd) as proc:
            yield UnderWay(server, out, args, proc, tree_after_lines(out, lines, proc))


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    log: Path


@contextmanager
def service_process(
    data: Path, *args: str, token: str | None = None, before: tuple[str, ...] = ()
) -> Iterator[ServiceProcess]:
    """``download [BEFORE] service --port 0 --data DATA [ARGS]`` in a child process, its
    output in a log beside DATA, yielded once it listens; killed at the end."""
    log = data.with_name(f"{data.name}-{time.monotonic_ns()}.log")  # one per start
    env = child_env(**({"DOWNLOADER_SERVICE_TOKEN": token} if token else {}))
    command = [*download_command(), *before, "service", "--port", "0", "--data", str(data)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*command, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        found = wait_for(
            lambda: _serving(log) or proc.poll() is not None, "the service to listen"
        )
        assert proc.poll() is None and isinstance(found, str), log.read_text()
        yield ServiceProcess(proc, found, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _serving(log: Path) -> str | None:
    found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", log.read_text())
    return found.group(1) if found else None
