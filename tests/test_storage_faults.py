"""Storage faults: one run per OUT (the lock), whole manifest lines, lines kept through an
interrupted re-run, and a disk that fills up, fails, vanishes or turns read-only mid-run.

Nothing waits a fixed time: the tests poll with a deadline and assert on behaviour (exit
code, the one line on stderr, what the server was asked, what is on disk), never on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ImageServer, jpeg, make_settings

from downloader import OutputInUseError
from downloader.lock import LOCK, OutputLock, holder
from downloader.pipeline import run
from downloader.server import make_app, server_thread
from downloader.settings import ServerSettings
from downloader.storage import MANIFEST, TEMP_SUFFIX, sha256

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0  # a poll gives up after this long (never reached when things work)


# ---------------------------------------------------------------------------- helpers


def wait_until(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def command(args: list[str]) -> list[str]:
    script = Path(sys.executable).parent / "download"
    return [*([str(script)] if script.exists() else [sys.executable, str(REPO / "cli.py")]), *args]


def child_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DOWNLOADER_") and not k.lower().endswith("_proxy")
    }


@contextmanager
def launched(args: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """``download ARGS`` in its own process group, killed with it if still running."""
    proc = subprocess.Popen(
        command(args),
        cwd=cwd,
        env=child_env(),
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
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(args), cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=120
    )


def cli_args(base_url: str, out: Path, count: int, backend: str = "asyncio") -> list[str]:
    url = base_url + "/{width}/{height}?lock={i}"
    return [
        "--backend", backend, "-n", str(count), "--concurrency", "4", "--size", "64x48",
        "--thumbnail-size", "16", "--url", url, "--out", str(out), "-q",
    ]  # fmt: skip


class Gate:
    """``/gate/{i}``: images from index ``after`` on wait until ``release()``, so a run
    stays mid-way for as long as a test needs, whatever the machine's speed."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.open = threading.Event()

    def app(self) -> web.Application:
        app = make_app(ServerSettings(seed=1))

        async def image(request: web.Request) -> web.Response:
            index = int(request.match_info["i"])
            while index >= self.after and not self.open.is_set():
                await asyncio.sleep(0.01)
            return web.Response(body=jpeg(index % 5, (64, 48)), content_type="image/jpeg")

        app.router.add_get("/gate/{i}", image)
        return app


@pytest.fixture
def gate() -> Iterator[tuple[Gate, str]]:
    state = Gate(after=4)
    with server_thread(state.app()) as server:
        yield state, server.base_url + "/gate/{i}"
    state.open.set()


def lines_of(out: Path) -> list[str]:
    path = out / MANIFEST
    return path.read_text().split("\n")[:-1] if path.exists() else []


def manifest(out: Path) -> dict[int, dict[str, Any]]:
    """Every manifest line parsed (each must be whole, valid JSON), one per index."""
    text = (out / MANIFEST).read_text()
    assert text == "" or text.endswith("\n"), "the manifest ends with a torn line"
    parsed = [json.loads(line) for line in text.splitlines()]
    indices = [p["index"] for p in parsed]
    assert len(indices) == len(set(indices)), "two lines for one index"
    return {p["index"]: p for p in parsed}


def assert_consistent(out: Path) -> dict[int, dict[str, Any]]:
    """Every ok line's files are on disk with its sha256; no file without a line; no temp."""
    lines = manifest(out)
    listed = {MANIFEST}
    for index, line in lines.items():
        if line["status"] == "ok":
            assert sha256((out / line["path"]).read_bytes()) == line["sha256"], index
            listed.add(line["path"])
            if line["thumbnail"]:
                assert (out / line["thumbnail"]).is_file(), index
                listed.add(line["thumbnail"])
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    hidden = {p for p in on_disk if Path(p).name.startswith(".")}
    assert {p for p in hidden if p.endswith(TEMP_SUFFIX)} == set(), "temp files left"
    assert on_disk - hidden - listed == set(), "files the manifest does not list"
    return lines


# ---------------------------------------------------------------------------- 1. the lock


def test_a_second_run_on_one_out_exits_2_at_once(
    gate: tuple[Gate, str], tmp_path: Path
) -> None:
    state, url = gate
    out = tmp_path / "pic"
    count = 12
    args = ["--backend", "threads", "-n", str(count), "--url", url, "--out", str(out), "-q"]
    with launched(args, tmp_path) as first:
        wait_until(lambda: len(list(out.glob("*.jpg"))) >= state.after, "the first images", first)
        # As if the first run had a write under way: the second must not sweep it.
        decoy = out / f".decoy{TEMP_SUFFIX}"
        decoy.write_bytes(b"")
        second = run_cli(args, tmp_path)
        assert first.poll() is None
        assert decoy.exists(), "the second run swept the first's temp files"
        decoy.unlink()
        state.open.set()
        stdout, stderr = first.communicate(timeout=60)

    assert second.returncode == 2, second
    assert second.stdout == ""
    assert second.stderr.splitlines() == [
        f"error: {out} is in use by another download (pid {first.pid})"
    ]
    assert first.returncode == 0, (stdout, stderr)
    lines = assert_consistent(out)
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())
    assert (out / LOCK).is_file()  # kept, not swept, and never listed


def test_the_python_api_raises_a_typed_error_and_touches_nothing(
    image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    (out / "thumbnails").mkdir(parents=True)
    (out / f".left-by-a-killed-run{TEMP_SUFFIX}").write_bytes(b"x")
    settings = make_settings("sync", out, image_server.base + "/64/48?lock={i}", 3)
    with OutputLock(out):
        assert holder(out) == os.getpid()
        before = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(OutputInUseError) as caught:
            run(settings)
        assert sorted(p.name for p in out.rglob("*")) == before
    assert caught.value.pid == os.getpid()
    assert f"{out} is in use by another download (pid {os.getpid()})" == str(caught.value)
    assert holder(out) is None
    assert run(settings).ok == 3  # released: the next run goes ahead


def test_a_run_killed_with_9_does_not_block_the_next(tmp_path: Path) -> None:
    out = tmp_path / "pic"
    count = 40
    with server_thread(make_app(ServerSettings(seed=4, latency_ms=40))) as server:
        args = cli_args(server.base_url, out, count, backend="processes")
        with launched(args, tmp_path) as proc:
            wait_until(lambda: len(lines_of(out)) >= 4, "4 manifest lines", proc)
            assert holder(out) == proc.pid
            os.kill(proc.pid, signal.SIGKILL)  # its pool workers may live on a moment
            proc.wait(timeout=30)
        assert holder(out) is None
        resumed = run_cli([*args, "--resume"], tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    lines = assert_consistent(out)
    assert sorted(lines) == list(range(count))
