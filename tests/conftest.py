"""Shared fixtures and helpers: the built-in server on a loopback port with hostile test
routes; the manifest reader; the server's counters; a scrubbed environment for child
processes; a fake sleep; polling with a deadline; assertions on what a run left on disk.
Test modules import from here, never from each other."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from PIL import Image

from downloader.backends import BACKENDS as REGISTRY
from downloader.backends import get_backend
from downloader.cli import main as cli_main
from downloader.errors import ConfigError
from downloader.server import RunningServer, make_app, render_photo, server_thread
from downloader.settings import (
    DaskSettings,
    HttpSettings,
    ServerSettings,
    Settings,
    ThumbnailSettings,
)
from downloader.storage import MANIFEST, TEMP_SUFFIX

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0  # how long a poll may wait before the test gives up (never reached normally)
T = TypeVar("T")

# The backend matrix is the registry's: a new backend cannot escape the contract tests.
# Backends that need an extra (dask: a LocalCluster of 2 workers, slow to start) run the
# contract suite when the extra is installed, and are left out of the longer suites.
BACKENDS = [name for name, (_, _, extra) in REGISTRY.items() if extra is None]


def unavailable(reason: str) -> NoReturn:
    """What a test needs is missing here: it fails under ``CI`` (CI must run every test)
    and is skipped elsewhere, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run it")
    pytest.skip(reason)


def _installed(name: str) -> bool:
    try:
        get_backend(name)
    except ConfigError:  # its extra is not installed
        return False
    return True


CONTRACT_BACKENDS = BACKENDS + [n for n in REGISTRY if n not in BACKENDS and _installed(n)]
OVERSIZE_CAP = 200_000


@lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A tiny PNG declaring 12000x12000 pixels: past Pillow's decompression-bomb limit."""
    width = height = 12000
    raw = (b"\x00" + b"\x00" * (width // 8)) * height  # 1-bit rows, filter byte 0
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x01\x00\x00\x00\x00"

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def jpeg(seed: int, size: tuple[int, int] = (200, 150)) -> bytes:
    return render_photo(size[0], size[1], seed, seed=99)


@dataclass
class ImageServer:
    server: RunningServer
    flaky_hits: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.server.base_url

    def stats(self) -> Counter[str]:
        return server_stats(self.base)


# Index -> what the hostile route /t/{token}/case/{i} does, and what we expect.
CASES = [
    "good",
    "traversal",
    "same-name-a",
    "same-name-b",
    "long-name",
    "html",
    "corrupt",
    "bomb",
    "oversize",
    "oversize-chunked",
    "not-found",
    "redirect-loop",
    "flaky",
    "truncated-jpeg",
]
OK_CASES = {"good", "traversal", "same-name-a", "same-name-b", "long-name", "flaky"}


def add_hostile_routes(app: web.Application, state: ImageServer) -> None:
    async def case(request: web.Request) -> web.StreamResponse:
        token, index = request.match_info["token"], int(request.match_info["i"])
        name = CASES[index % len(CASES)]
        base = f"/t/{token}"
        if name == "good":
            return web.Response(body=jpeg(1), content_type="image/jpeg")
        if name == "traversal":
            raise web.HTTPFound(f"{base}/files/..%2F..%2Fx.jpg")
        if name == "same-name-a":
            raise web.HTTPFound(f"{base}/a/photo.jpg")
        if name == "same-name-b":
            raise web.HTTPFound(f"{base}/b/photo.jpg")
        if name == "long-name":
            raise web.HTTPFound(f"{base}/files/{'n' * 300}.jpg")
        if name == "html":
            return web.Response(text="<html>hi</html>", content_type="text/html")
        if name == "corrupt":
            return web.Response(
                body=b"\xff\xd8\xff\xe0" + b"garbage" * 500, content_type="image/jpeg"
            )
        if name == "bomb":
            return web.Response(body=bomb_png(), content_type="image/png")
        if name == "oversize":
            return web.Response(
                body=b"\xff\xd8\xff" + b"x" * OVERSIZE_CAP, content_type="image/jpeg"
            )
        if name == "oversize-chunked":
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(OVERSIZE_CAP // 10_000 + 5):
                await resp.write(b"\xff" * 10_000)
            await resp.write_eof()
            return resp
        if name == "not-found":
            raise web.HTTPNotFound()
        if name == "redirect-loop":
            raise web.HTTPFound(request.path)
        if name == "flaky":
            hits = state.flaky_hits[request.path] = state.flaky_hits.get(request.path, 0) + 1
            if hits == 1:
                raise web.HTTPServiceUnavailable(headers={"Retry-After": "0"})
            return web.Response(body=jpeg(2), content_type="image/jpeg")
        if name == "truncated-jpeg":
            body = jpeg(3)
            return web.Response(body=body[: len(body) // 2], content_type="image/jpeg")
        raise AssertionError(name)

    async def files(request: web.Request) -> web.Response:
        return web.Response(body=jpeg(4), content_type="image/jpeg")

    async def named(request: web.Request) -> web.Response:
        seed = 5 if request.match_info["who"] == "a" else 6
        return web.Response(body=jpeg(seed), content_type="image/jpeg")

    app.router.add_get("/t/{token}/case/{i}", case)
    app.router.add_get("/t/{token}/files/{name:.*}", files)
    app.router.add_get("/t/{token}/{who}/photo.jpg", named)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    app = make_app(ServerSettings(seed=7, pool_size=10))
    state = ImageServer(server=RunningServer("127.0.0.1", 0))
    add_hostile_routes(app, state)
    with server_thread(app) as running:
        state.server = running
        yield state


def make_settings(backend: str, out: Path, url: str, count: int, **http: object) -> Settings:
    return Settings(
        backend=backend,
        count=count,
        url=url,
        out=out,
        progress=False,
        http=HttpSettings(
            **{
                "concurrency": 4,
                "timeout": 10.0,
                "retries": 2,
                "backoff": 0.01,
                "max_backoff": 0.05,
                **http,  # type: ignore[arg-type]
            }
        ),
        thumbnails=ThumbnailSettings(size=64),
        dask=DaskSettings(workers=2, shard_size=4),
    )


def decode_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def wait_for(
    condition: Callable[[], T],
    what: str = "the condition",
    *,
    seconds: float = DEADLINE_S,
    proc: subprocess.Popen[Any] | None = None,
) -> T:
    """Poll ``condition`` until it returns something true, and return that; fail if ``proc``
    exits first or after ``seconds`` (a deadline, never reached when things work)."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


class FakeSleep:
    """Records the waits a retry policy asks for instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class FakeAsyncSleep(FakeSleep):
    """FakeSleep for asyncio code: an awaitable sleep that records and returns at once."""

    async def __call__(self, seconds: float) -> None:  # type: ignore[override]
        self.calls.append(seconds)


# ---------------------------------------------------------------------------- the server


def server_stats(server: RunningServer | str) -> Counter[str]:
    """The built-in server's request counters (``/__stats``): entries, faults, paths."""
    base = server if isinstance(server, str) else server.base_url
    with urllib.request.urlopen(f"{base}/__stats", timeout=10) as resp:
        return Counter(json.loads(resp.read()))


def entry_key(index: int) -> str:
    """The path and query the built-in server counts for image ``index`` (320x240)."""
    return f"/320/240?lock={index}"


# ---------------------------------------------------------------------------- the manifest


def manifest_text(out: Path) -> str:
    path = out / MANIFEST
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


def complete_lines(out: Path) -> list[str]:
    """Manifest lines that end with a newline; a torn last line (kill -9) is left out."""
    return manifest_text(out).split("\n")[:-1]


def records(out: Path) -> list[dict[str, Any]]:
    """Every complete manifest line, parsed: each one must be valid JSON."""
    parsed = []
    for line in complete_lines(out):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"manifest line is not valid JSON: {line!r}")
    return parsed


def by_index(lines: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Manifest records keyed by index; two lines for one index fail the test."""
    indices = [line["index"] for line in lines]
    assert len(indices) == len(set(indices)), f"duplicate manifest lines: {sorted(indices)}"
    return {line["index"]: line for line in lines}


# ---------------------------------------------------------------------------- child processes


def child_env(**extra: str) -> dict[str, str]:
    """The developer's environment without DOWNLOADER_* settings or proxies, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DOWNLOADER_") and not name.lower().endswith("_proxy")
    }
    return {**env, **extra}


@pytest.fixture
def scrubbed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DOWNLOADER_* setting from the developer's shell reaches this test."""
    for name in list(os.environ):
        if name.startswith("DOWNLOADER_"):
            monkeypatch.delenv(name)


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


# ---------------------------------------------------------------------------- what is on disk


def visible_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]


def assert_no_temp_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert leftovers == []


def assert_visible_images_decode(out: Path) -> None:
    """A killed run may leave hidden temp files, never a partial image under its real name."""
    for path in visible_files(out):
        if path.name == MANIFEST:
            continue
        assert not path.name.endswith(TEMP_SUFFIX), path
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()  # raises on a truncated or corrupt file


def assert_ok_files_match(out: Path, lines: dict[int, dict[str, Any]]) -> None:
    for index, line in lines.items():
        if line["status"] != "ok":
            continue
        data = (out / line["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"], index
        assert len(data) == line["bytes"], index
        if line["thumbnail"] is not None:
            assert (out / line["thumbnail"]).is_file(), index
