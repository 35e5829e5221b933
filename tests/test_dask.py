"""The dask backend on real Dask: a LocalCluster, and the real `dask scheduler` and
`dask worker` programs on 127.0.0.1 with one worker killed mid-run."""

from __future__ import annotations

import builtins
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import make_settings, records, wait_for

from downloader.backends import get_backend
from downloader.backends.dask import check_out
from downloader.errors import ClusterUnreachableError, ConfigError, StorageError
from downloader.pipeline import run
from downloader.server import make_app, server_thread
from downloader.settings import DaskSettings, ServerSettings

# distributed is in the test extra: without it this module fails to import (an error in
# CI, never a skip).
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def slow_server() -> Iterator[str]:
    with server_thread(make_app(ServerSettings(latency_ms=40, seed=5))) as server:
        yield server.base_url


@pytest.fixture
def cluster() -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A real scheduler and two single-process workers, as a user would start them."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        **quiet,
    )
    workers = [
        subprocess.Popen(
            [
                BIN / "dask",
                "worker",
                address,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
            ],
            **quiet,
        )
        for _ in range(2)
    ]
    try:
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in [*workers, scheduler]:
            proc.kill()
            proc.wait(10)


def test_worker_killed_mid_run_loses_and_duplicates_nothing(
    cluster: tuple[str, list[subprocess.Popen[bytes]]], slow_server: str, tmp_path: Path
) -> None:
    address, workers = cluster
    out = tmp_path / "pic"
    count = 200
    proc = subprocess.Popen(
        [
            BIN / "download",
            "--backend",
            "dask",
            "--scheduler",
            address,
            "-n",
            str(count),
            "--shard-size",
            "10",
            "--concurrency",
            "4",
            "--out",
            str(out),
            "-q",
            "--url",
            slow_server + "/{width}/{height}?lock={i}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: len(records(out)) >= 40, "40 results", proc=proc)
    assert workers[0].poll() is None, "the worker to kill is running"
    workers[0].send_signal(signal.SIGKILL)
    assert workers[0].wait(10) == -signal.SIGKILL
    at_kill = len(records(out))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    # The kill landed mid-run: results were recorded before it and after it.
    assert 40 <= at_kill < count, at_kill
    lines = records(out)
    assert sorted(r["index"] for r in lines) == list(range(count))  # each exactly once
    for record in lines:
        assert record["status"] == "ok"
        data = (out / record["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert (out / record["thumbnail"]).is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
    images = [p for p in out.iterdir() if p.suffix == ".jpg"]
    assert len(images) == count


def test_local_cluster_runs_the_pipeline(slow_server: str, tmp_path: Path) -> None:
    out = tmp_path / "pic"
    settings = make_settings("dask", out, slow_server + "/{width}/{height}?lock={i}", 30)
    dask = DaskSettings(shard_size=7, workers=2)
    report = run(settings.replace(dask=dask, timeline=True))
    assert (report.ok, report.failed) == (30, 0)
    assert sorted(r["index"] for r in records(out)) == list(range(30))
    # The timeline's spans come back from the workers: every image's three phases, each
    # measured in a worker process (one lane group per worker), none in this one.
    phases: dict[int, set[str]] = {}
    for span in report.spans:
        phases.setdefault(span.index, set()).add(span.phase)
    assert phases == {i: {"wait", "cpu", "write"} for i in range(30)}
    workers = {span.process for span in report.spans}
    assert 1 <= len(workers) <= 2 and os.getpid() not in workers


def test_worker_that_cannot_write_out_is_reported(tmp_path: Path) -> None:
    assert check_out(str(tmp_path / "ok")) is None
    assert "cannot write" in str(check_out("/proc/no-such-dir/pic"))


def test_unreachable_scheduler_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from downloader.backends import dask as dask_backend

    monkeypatch.setattr(dask_backend, "CONNECT_TIMEOUT_S", 1.0)  # nothing listens: no wait
    settings = make_settings("dask", tmp_path / "pic", "http://127.0.0.1:9/{i}", 1)
    settings = settings.replace(dask=DaskSettings(scheduler=f"tcp://127.0.0.1:{free_port()}"))
    with pytest.raises(ClusterUnreachableError, match="cannot reach the Dask scheduler") as info:
        run(settings)
    assert not isinstance(info.value, StorageError)  # a network problem, not OUT's


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "distributed" or name.startswith("distributed."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "downloader.backends.dask", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"pip install 'downloader\[dask\]'"):
        get_backend("dask")


def test_a_shard_writes_off_its_event_loop(tmp_path: Path, monkeypatch: Any) -> None:
    """OUT is a shared file system under dask, where a write may block for long: a
    worker's shard writes through aiofiles' threads, never on its event loop."""
    import threading

    from downloader import work
    from downloader.backends.dask import run_shard
    from downloader.jobs import Job
    from downloader.storage import write_files

    writers: list[str] = []

    def recording_write(files: list[tuple[Path, bytes]]) -> None:
        writers.append(threading.current_thread().name.split("_")[0])
        write_files(files)

    import aiofiles.os

    monkeypatch.setattr(work, "write_files", recording_write)  # on the loop
    monkeypatch.setattr(work, "write_files_async", aiofiles.os.wrap(recording_write))
    out = tmp_path / "pic"
    (out / "thumbnails").mkdir(parents=True)
    with server_thread(make_app(ServerSettings())) as server:
        settings = make_settings("dask", out, server.base_url + "/64/48?lock={i}", 4)
        results = run_shard([Job(i, server.base_url + f"/64/48?lock={i}") for i in range(4)],
                            settings)  # fmt: skip
    assert [r.status for r in results] == ["ok"] * 4
    assert len(writers) == 4 and "MainThread" not in writers
