"""Storage faults: one run per OUT (the lock), whole manifest lines, lines kept through an
interrupted re-run, and a disk that fills up, fails, vanishes or turns read-only mid-run.

Nothing waits a fixed time: the tests poll with a deadline and assert on behaviour (exit
code, the one line on stderr, what the server was asked, what is on disk), never on time.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import (
    CONTRACT_BACKENDS,
    DEADLINE_S,
    CountingRoute,
    ImageServer,
    child_env,
    complete_lines,
    jpeg,
    launched,
    make_settings,
    run_cli,
    server_stats,
    unavailable,
    wait_for,
)

from downloader import OutputInUseError, StorageFaultError
from downloader.errors import StorageFault
from downloader.lock import LOCK, OutputLock, holder
from downloader.manifest import ManifestWriter
from downloader.pipeline import run
from downloader.result import Result
from downloader.server import RunningServer, make_app, server_thread
from downloader.settings import ServerSettings
from downloader.storage import MANIFEST, TEMP_SUFFIX, sha256, storage_fault

# ---------------------------------------------------------------------------- helpers


DASK_WORKERS = 1  # the dask backend's LocalCluster: one worker starts in half the time
ENV = child_env(DOWNLOADER_DASK_WORKERS=str(DASK_WORKERS))


def cli_args(
    base_url: str, out: Path, count: int, backend: str = "asyncio", concurrency: int = 2
) -> list[str]:
    url = base_url + "/{width}/{height}?lock={i}"
    return [
        "--backend", backend, "-n", str(count), "--concurrency", str(concurrency),
        "--size", "64x48", "--shard-size", "4",
        "--thumbnail-size", "16", "--url", url, "--out", str(out), "-q",
    ]  # fmt: skip


class Gate(CountingRoute):
    """``/gate/{i}``: images from index ``after`` on wait until ``open`` is set, so a run
    stays mid-way for as long as a test needs, whatever the machine's speed. Indices in
    ``fail`` answer 503 (with ``--retries 0``, a failed image). Counts every request."""

    route = "/gate/{i}"

    def __init__(self, after: int, fail: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.after = after
        self.fail = fail
        self.open = threading.Event()

    async def answer(self, index: int) -> web.Response:
        while index >= self.after and not self.open.is_set():
            await asyncio.sleep(0.01)
        if index in self.fail:
            raise web.HTTPServiceUnavailable()
        return web.Response(body=jpeg(index % 5, (64, 48)), content_type="image/jpeg")


def gate_args(base_url: str, out: Path, count: int) -> list[str]:
    """A run of ``count`` images from the Gate, with no retries: a 503 fails at once."""
    url = base_url + "/gate/{i}"
    return ["-n", str(count), "--url", url, "--out", str(out), "--retries", "0", "-q"]


@contextmanager
def failed_first_run(
    tmp_path: Path, count: int, failing: frozenset[int], *extra: str
) -> Iterator[tuple[Gate, Path, list[str]]]:
    """A Gate that fails ``failing`` and a first run of ``count`` images into tmp_path/pic
    (exit 1: those images failed); yields the Gate, OUT and the run's arguments."""
    state = Gate(after=count, fail=failing)
    out = tmp_path / "pic"
    with server_thread(state.app()) as server:
        args = [*gate_args(server.base_url, out, count), *extra]
        assert run_cli(args, tmp_path, ENV).returncode == 1
        yield state, out, args


@pytest.fixture
def gate() -> Iterator[tuple[Gate, str]]:
    state = Gate(after=4)
    with server_thread(state.app()) as server:
        yield state, server.base_url + "/gate/{i}"
    state.open.set()


@contextmanager
def past_the_gate(
    gate: tuple[Gate, str], cwd: Path, out: Path, count: int, *options: str
) -> Iterator[tuple[list[str], subprocess.Popen[str]]]:
    """``download OPTIONS`` of ``count`` images from the Gate into OUT, once the images
    before the gate have their lines (the rest wait for it); yields its arguments and it."""
    state, url = gate
    args = [*options, "-n", str(count), "--url", url, "--out", str(out), "-q"]
    with launched(args, cwd, env=ENV) as proc:
        wait_for(lambda: len(complete_lines(out)) >= state.after, "the first lines", proc=proc)
        yield args, proc


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


def test_a_second_run_on_one_out_exits_2_at_once(gate: tuple[Gate, str], tmp_path: Path) -> None:
    state, url = gate
    out = tmp_path / "pic"
    count = 12
    args = ["--backend", "threads", "-n", str(count), "--url", url, "--out", str(out), "-q"]
    with launched(args, tmp_path, env=ENV) as first:
        wait_for(
            lambda: len(list(out.glob("*.jpg"))) >= state.after, "the first images", proc=first
        )
        # As if the first run had a write under way: the second must not sweep it.
        decoy = out / f".decoy{TEMP_SUFFIX}"
        decoy.write_bytes(b"")
        second = run_cli(args, tmp_path, ENV)
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


def test_the_lock_holds_on_a_file_system_that_wants_a_writable_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS carries ``flock`` out as a POSIX lock: an exclusive one on a read-only
    descriptor fails with EBADF. The lock then takes a read-write descriptor, still
    excludes a second run, and is released at the end."""
    import fcntl

    from downloader import lock

    real_flock = fcntl.flock

    def nfs_flock(fd: int, operation: int) -> None:
        writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        if operation & fcntl.LOCK_EX and not writable:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real_flock(fd, operation)

    monkeypatch.setattr(lock.fcntl, "flock", nfs_flock)
    out = tmp_path / "pic"
    with OutputLock(out):
        assert holder(out) == os.getpid()
        with pytest.raises(OutputInUseError) as caught:
            OutputLock(out).acquire()
        assert caught.value.pid == os.getpid()
    assert holder(out) is None
    with OutputLock(out):  # released: the next run gets it
        assert holder(out) == os.getpid()


def test_a_run_killed_with_9_does_not_block_the_next(
    gate: tuple[Gate, str], tmp_path: Path
) -> None:
    state = gate[0]
    out = tmp_path / "pic"
    count = 12
    with past_the_gate(gate, tmp_path, out, count, "--concurrency", "2") as (args, proc):
        assert holder(out) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)  # its thumbnail pool may live on a moment
        proc.wait(timeout=30)
    assert holder(out) is None
    state.open.set()
    resumed = run_cli([*args, "--resume"], tmp_path, ENV)

    assert resumed.returncode == 0, resumed.stderr
    assert sorted(assert_consistent(out)) == list(range(count))


# ---------------------------------------------------------------------------- 2. whole lines


def ok_result(out: Path, index: int) -> Result:
    """An ok Result whose image file is on disk, as a backend hands it over."""
    name = f"{index:06d}.jpg"
    data = jpeg(index, (32, 24))
    (out / name).write_bytes(data)
    return Result(index=index, url=f"http://h/{index}", status="ok", path=name, bytes=len(data),
                  sha256=sha256(data))  # fmt: skip


CAUSES = {errno.ENOSPC: "no space left on device", errno.EIO: "I/O error",
          errno.EROFS: "read-only file system"}  # fmt: skip
FIXES = {errno.ENOSPC: "free some space", errno.EIO: "check the disk",
         errno.EROFS: "make it writable again"}  # fmt: skip
RESUME = "run the same command with --resume"


class FailingWrite:
    """``os.write`` for the manifest that lands ``room`` more bytes, then fails with
    ``errno``: a disk that fills up (a short write first) or breaks mid-line."""

    def __init__(self, room: int, code: int) -> None:
        self.room = room
        self.code = code
        self.real = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(self.code, os.strerror(self.code))
        done = self.real(fd, bytes(data[: self.room]))
        self.room -= done
        return done


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS], ids=errno.errorcode.get)
def test_a_failed_manifest_write_leaves_whole_lines_and_no_unlisted_file(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ManifestWriter(tmp_path)
    for index in range(3):
        writer.write(ok_result(tmp_path, index))
    torn = ok_result(tmp_path, 3)
    # Half a line lands (a disk filling up writes short first), then the write fails.
    monkeypatch.setattr("downloader.manifest.os.write", FailingWrite(100, code))
    with pytest.raises(StorageFaultError) as caught:
        writer.write(torn)
    monkeypatch.undo()

    assert str(caught.value) == f"{CAUSES[code]} writing {tmp_path}: {FIXES[code]}, then {RESUME}"
    assert caught.value.lost == (torn,)
    assert sorted(assert_consistent(tmp_path)) == [0, 1, 2]  # image 3 is gone with its line
    # Once failed, the writer records nothing more, and removes what it is given.
    late = ok_result(tmp_path, 4)
    with pytest.raises(StorageFaultError) as again:
        writer.write(late)
    assert again.value.lost == (late,)
    writer.close()
    assert sorted(assert_consistent(tmp_path)) == [0, 1, 2]


def test_a_manifest_that_cannot_be_swapped_in_is_a_fault(tmp_path: Path) -> None:
    out = tmp_path / "pic"
    out.mkdir()
    writer = ManifestWriter(out)
    result = ok_result(out, 0)
    shutil.rmtree(out)
    with pytest.raises(StorageFaultError, match=f"the output folder {out} was removed"):
        writer.write(result)
    writer.close()
    assert not out.exists()


# ---------------------------------------------------------------------------- 3. re-runs


def test_an_interrupted_retry_failed_keeps_every_line(tmp_path: Path) -> None:
    count = 60
    failing = frozenset(range(1, count, 3))  # 20 images that fail on every attempt
    with failed_first_run(tmp_path, count, failing) as (state, out, args):
        before = manifest(out)
        assert {i for i, line in before.items() if line["status"] != "ok"} == failing

        # Re-run: the first 4 failed images answer at once, the rest hang until Ctrl-C.
        state.after = sorted(failing)[4]
        with launched([*args, "--retry-failed", "--concurrency", "2"], tmp_path, env=ENV) as proc:
            wait_for(lambda: len(complete_lines(out)) >= count + 4, "4 lines re-run", proc=proc)
            os.kill(proc.pid, signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, (stdout, stderr)
        interrupted = assert_consistent(out)
        assert sorted(interrupted) == list(range(count))
        # Every index keeps a line: a new one, or the one it had before.
        assert {i: line["status"] for i, line in interrupted.items()} == {
            i: line["status"] for i, line in before.items()
        }

        state.open.set()
        hits = state.hits.copy()
        assert run_cli([*args, "--retry-failed"], tmp_path, ENV).returncode == 1
        assert {i for i in range(count) if state.hits[i] > hits[i]} == failing
    assert sorted(assert_consistent(out)) == list(range(count))


# ---------------------------------------------------------------------------- 4. faults

FAULTY_DISK = Path(__file__).parent / "faulty_disk"  # a sitecustomize that breaks writes


def fault_text(fault: StorageFault | None) -> str | None:
    """A fault as a run words it."""
    return fault.then(RESUME) if fault is not None else None


def fault_line(code: int, out: Path) -> str:
    return f"error: {CAUSES[code]} writing {out}: {FIXES[code]}, then {RESUME}"


def assert_stopped_by_fault(
    proc: subprocess.CompletedProcess[str] | subprocess.Popen[str],
    stdout: str,
    stderr: str,
    line: str,
) -> None:
    assert proc.returncode == 3, (stdout, stderr)
    assert "Traceback" not in stderr
    # The one error line (a --resume also says what it keeps, on a line of its own).
    assert [text for text in stderr.splitlines() if not text.startswith("resuming:")] == [line]
    assert stdout.startswith("stopped: "), stdout


def in_flight_bound(backend: str, concurrency: int, shard_size: int = 4) -> int:
    """Images a backend may fetch and not record once a write has failed: two per
    connection (the one running, and the one a worker takes while the fault is on its way
    to the recorder). The pool backends hold twice that: processes keeps 2 chunks of 2
    jobs per worker queued, and hybrid's workers hold 2 jobs per connection on credit
    while results already sent wait to be recorded (after the fault they are not: their
    files are removed). Dask cannot take back a shard once submitted (2 per worker thread,
    plus the one sent as an earlier shard completes): each shard stops at its first fault,
    but may have started all its jobs by then."""
    if backend == "dask":
        return (2 * DASK_WORKERS + 1) * shard_size
    if backend in ("processes", "hybrid"):
        return 4 * concurrency
    return 2 * concurrency


# ENOSPC on every backend; the other faults on one each (they differ only in the message).
# An image's writes: its thumbnail and itself; one without thumbnails, where asyncio checks
# and writes each image on its event loop (thumbnails.executor = "auto").
NO_THUMBNAIL = ["--thumbnail-size", "0", "--verify", "header"]

DISK_FAULTS = [
    *((backend, errno.ENOSPC) for backend in CONTRACT_BACKENDS),
    ("asyncio", errno.EIO),
    ("threads", errno.EROFS),
    ("asyncio-inline", errno.ENOSPC),  # no thumbnails: written on the event loop
]


@pytest.mark.parametrize(
    ("backend", "code"), DISK_FAULTS, ids=[f"{b}-{errno.errorcode[c]}" for b, c in DISK_FAULTS]
)
def test_a_disk_fault_stops_the_run_on_every_backend(
    backend: str, code: int, tmp_path: Path
) -> None:
    count, after, concurrency = 40, 8, 2  # 8 writes succeed: 4 images with thumbnails
    extra, per_image = [], 2
    if backend == "asyncio-inline":
        backend, extra, per_image = "asyncio", NO_THUMBNAIL, 1
    out = tmp_path / "pic"
    counter = tmp_path / "writes"
    env = {
        **ENV,
        "FAULTY_DISK": f"{errno.errorcode[code]}:{after}:{counter}",
        "PYTHONPATH": os.pathsep.join([str(FAULTY_DISK), os.environ.get("PYTHONPATH", "")]),
    }
    with server_thread(make_app(ServerSettings(seed=2, latency_ms=20))) as server:
        args = [*cli_args(server.base_url, out, count, backend, concurrency), *extra]
        done = run_cli(args, tmp_path, env)
        fetched = server_stats(server)

    assert_stopped_by_fault(done, done.stdout, done.stderr, fault_line(code, out))
    lines = assert_consistent(out)
    # In-flight images are not blamed: nothing is recorded as failed.
    assert all(line["status"] == "ok" for line in lines.values())
    assert len(lines) <= after // per_image
    # No fetching after the fault beyond what was in flight.
    writes = counter.stat().st_size
    bound = after // per_image + 1 + in_flight_bound(backend, concurrency)
    assert fetched["entry"] <= bound, writes


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real small file system at ``folder`` (root can mount a tmpfs); where the machine
    refuses, the test fails under ``CI`` and is skipped elsewhere."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, options: str) -> None:
    """``mount -o remount,OPTIONS``; a read-only remount is refused (EBUSY) while a file
    is open for writing, so it is tried until a write in flight has finished."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        done = subprocess.run(
            ["mount", "-o", f"remount,{options}", str(folder)], capture_output=True, text=True
        )
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"cannot remount {folder} {options}: {done.stderr}")
        time.sleep(0.01)


@contextmanager
def small_disk(
    tmp_path: Path, backend: str, count: int, *extra: str
) -> Iterator[tuple[Path, Path, list[str], RunningServer]]:
    """A 1 MiB file system, a server, and the arguments of a run of 320x240 images into it."""
    with (
        tmpfs(tmp_path / "small", "1m") as small,
        server_thread(make_app(ServerSettings(seed=2))) as server,
    ):
        out = small / "pic"
        args = cli_args(server.base_url, out, count, backend, concurrency=4)
        args[args.index("--size") + 1] = "320x240"
        yield small, out, [*args, *extra], server


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_a_full_file_system_stops_the_run_and_resume_finishes_it(
    backend: str, tmp_path: Path
) -> None:
    count = 80  # ~24 KiB an image and its thumbnail: 1 MiB holds about 40
    with small_disk(tmp_path, backend, count) as (small, out, args, server):
        full = run_cli(args, tmp_path, ENV)
        fetched = server_stats(server)
        assert_stopped_by_fault(full, full.stdout, full.stderr, fault_line(errno.ENOSPC, out))
        lines = assert_consistent(out)
        assert all(line["status"] == "ok" for line in lines.values())
        assert 0 < len(lines) < count
        assert fetched["entry"] <= len(lines) + 1 + in_flight_bound(backend, 4)

        remount(small, "size=64m")
        resumed = run_cli([*args, "--resume"], tmp_path, ENV)
        assert resumed.returncode == 0, resumed.stderr
        lines = assert_consistent(out)
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())


def test_out_removed_mid_run_stops_it(gate: tuple[Gate, str], tmp_path: Path) -> None:
    state = gate[0]
    out = tmp_path / "pic"
    with past_the_gate(gate, tmp_path, out, 40, "--concurrency", "2") as (_, proc):
        shutil.rmtree(out)
        state.open.set()
        stdout, stderr = proc.communicate(timeout=DEADLINE_S)
    line = f"error: the output folder {out} was removed: {RESUME}"
    assert_stopped_by_fault(proc, stdout, stderr, line)
    assert not out.exists()
    assert sum(state.hits.values()) <= state.after + in_flight_bound("asyncio", 2)


def test_out_made_read_only_mid_run_stops_it(gate: tuple[Gate, str], tmp_path: Path) -> None:
    state = gate[0]
    options = ("--backend", "threads", "--concurrency", "2")
    with tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "pic"
        with past_the_gate(gate, tmp_path, out, 40, *options) as (_, proc):
            remount(disk, "ro")
            state.open.set()
            stdout, stderr = proc.communicate(timeout=DEADLINE_S)
        assert_stopped_by_fault(proc, stdout, stderr, fault_line(errno.EROFS, out))
        assert sum(state.hits.values()) <= state.after + in_flight_bound("threads", 2)
        assert sorted(assert_consistent(out)) == list(range(state.after))


def test_a_retry_failed_stopped_by_a_disk_fault_keeps_every_line(tmp_path: Path) -> None:
    count = 30
    failing = frozenset(range(0, count, 3))  # 10 images fail on the first run
    with failed_first_run(tmp_path, count, failing, "--concurrency", "1") as (state, out, args):
        state.fail = frozenset()  # they would all succeed now, but the disk breaks
        env = {
            **ENV,
            "FAULTY_DISK": f"ENOSPC:4:{tmp_path / 'writes'}",  # 2 images and their thumbnails
            "PYTHONPATH": os.pathsep.join([str(FAULTY_DISK), os.environ.get("PYTHONPATH", "")]),
        }
        broken = run_cli([*args, "--retry-failed"], tmp_path, env)
        assert_stopped_by_fault(broken, broken.stdout, broken.stderr, fault_line(errno.ENOSPC, out))
        lines = assert_consistent(out)
        assert sorted(lines) == list(range(count))  # every index kept a line
        still_failed = {i for i, line in lines.items() if line["status"] != "ok"}
        assert len(still_failed) == len(failing) - 2

        hits = state.hits.copy()
        assert run_cli([*args, "--retry-failed"], tmp_path, ENV).returncode == 0
        assert {i for i in range(count) if state.hits[i] > hits[i]} == still_failed
    lines = assert_consistent(out)
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())


async def test_a_service_job_stopped_by_a_disk_fault_fails_with_the_line_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from downloader.config import load_settings
    from downloader.service.app import make_app

    data = tmp_path / "data"
    app = make_app(load_settings(environ={}, overrides={"service.data": data}))
    # The job's process inherits the service's environment: its disk breaks after 2 images.
    monkeypatch.setenv("FAULTY_DISK", f"ENOSPC:4:{tmp_path / 'writes'}")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(FAULTY_DISK), os.environ.get("PYTHONPATH", "")])
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        body = {"local": True, "count": 12, "thumbnails": {"size": 32}, "http": {"concurrency": 2}}
        response = await client.post("/api/v1/jobs", json=body)
        assert response.status == 201, await response.text()
        job_id = (await response.json())["id"]

        async def ended() -> dict[str, Any]:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline:
                job: dict[str, Any] = await (await client.get(f"/api/v1/jobs/{job_id}")).json()
                if job["state"] in ("done", "failed", "cancelled"):
                    return job
                await asyncio.sleep(0.05)
            pytest.fail("the job did not end")

        failed = await ended()
        out = data / "jobs" / job_id
        assert failed["state"] == "failed"
        # The CLI's line, with the way on in the service's words.
        expected = fault_line(errno.ENOSPC, out).removeprefix("error: ")
        assert failed["error"] == expected.replace(RESUME, "retry the job")
        assert failed["error"].endswith("free some space, then retry the job")
        assert len(assert_consistent(out)) <= 2

        monkeypatch.delenv("FAULTY_DISK")  # space freed: retry continues the job
        assert (await client.post(f"/api/v1/jobs/{job_id}/retry")).status == 202
        done = await ended()
        assert (done["state"], done["ok"], done["failed"]) == ("done", 12, 0)
        assert sorted(assert_consistent(out)) == list(range(12))
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "no space left on device writing {out}: free some space"),
        (errno.EDQUOT, "disk quota exceeded writing {out}: free some space or raise the quota"),
        (errno.EROFS, "read-only file system writing {out}: make it writable again"),
        (errno.EIO, "I/O error writing {out}: check the disk"),
        (errno.EACCES, "permission denied writing {out}: make it writable again"),
        (errno.ENAMETOOLONG, None),  # this image's name only: its own failed result
        (errno.EFBIG, None),
    ],
    ids=lambda value: errno.errorcode.get(value, "") if isinstance(value, int) else "",
)
def test_storage_fault_names_the_cause_and_the_way_on(
    code: int, expected: str | None, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    (out / "thumbnails").mkdir(parents=True)
    reason = fault_text(storage_fault(OSError(code, os.strerror(code)), out))
    assert reason == (expected and f"{expected.format(out=out)}, then {RESUME}")


def test_a_missing_folder_is_a_fault_only_when_out_is_gone(tmp_path: Path) -> None:
    out = tmp_path / "pic"
    (out / "thumbnails").mkdir(parents=True)
    missing = OSError(errno.ENOENT, "No such file or directory")
    assert storage_fault(missing, out) is None
    (out / "thumbnails").rmdir()
    assert (
        fault_text(storage_fault(missing, out))
        == f"the output folder {out / 'thumbnails'} was removed: {RESUME}"
    )
    out.rmdir()
    assert (
        fault_text(storage_fault(missing, out)) == f"the output folder {out} was removed: {RESUME}"
    )


@pytest.mark.parametrize("backend", ["asyncio", "processes"])
def test_a_full_disk_mid_shard_stops_the_run_and_resume_completes_the_shards(
    backend: str, tmp_path: Path
) -> None:
    count, size = 120, 20  # ~19 KiB a 320x240 sample: 1 MiB holds a few shards, not six
    shards = ["--output-format", "webdataset", "--samples-per-shard", str(size)]
    with small_disk(tmp_path, backend, count, *shards) as (small, out, args, _):
        full = run_cli(args, tmp_path, ENV)
        assert_stopped_by_fault(full, full.stdout, full.stderr, fault_line(errno.ENOSPC, out))
        committed = sorted(p.name for p in out.glob("*.tar"))
        assert len(committed) < count // size
        for name in committed:  # every shard there is whole
            with tarfile.open(out / name) as tar:
                assert len([m for m in tar if m.name.endswith(".jpg")]) == size, name
        assert not list(out.glob(".*.part")), "the open shards were dropped"

        remount(small, "size=64m")
        resumed = run_cli([*args, "--resume"], tmp_path, ENV)
        assert resumed.returncode == 0, resumed.stderr
        shards = sorted(out.glob("*.tar"))
        assert [p.name for p in shards] == [f"{k:05d}.tar" for k in range(count // size)]
        keys: list[int] = []
        for path in shards:
            with tarfile.open(path) as tar:
                keys += [int(m.name.split(".")[0]) for m in tar if m.name.endswith(".jpg")]
        assert sorted(keys) == list(range(count))  # each index once, in one committed shard
