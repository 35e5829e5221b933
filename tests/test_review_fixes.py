"""Regressions for bugs a code review found: each was a traceback, a hang or lost data."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ImageServer, make_settings

from downloader import ConfigError, StopToken, download
from downloader.cli import main
from downloader.errors import RetryableFetchError
from downloader.fetch import check_declared_length, fetch_sync, new_session, parse_retry_after
from downloader.lock import LOCK
from downloader.manifest import ManifestWriter, read_manifest
from downloader.pipeline import run
from downloader.result import Result
from downloader.server import make_app, server_thread
from downloader.settings import HttpSettings, ServerSettings
from downloader.storage import MANIFEST, prepare_out


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def manifest_indices(out: Path) -> list[int]:
    return sorted(json.loads(line)["index"] for line in (out / MANIFEST).read_text().splitlines())


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_unusable_host_in_a_list_is_a_failed_result(
    backend: str, image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{image_server.base}/320/240?lock=1\nhttp://a..b/x.jpg\nhttp://h:99999/\n")
    code, _, stderr = invoke("--backend", backend, "--urls", str(listing), "--out", str(out), "-q")
    assert code == 1 and "Traceback" not in stderr
    assert manifest_indices(out) == [0, 1, 2]  # the good image has its line


def test_unusable_host_in_a_template_is_a_usage_error(tmp_path: Path) -> None:
    code, _, stderr = invoke("--url", "http://a..b/{i}.jpg", "--out", str(tmp_path / "p"))
    assert code == 2 and stderr.startswith("error:") and not (tmp_path / "p").exists()


@pytest.mark.parametrize("value", ["²", "1" * 5000, "-1", "", "12a"])
def test_hostile_numeric_headers_are_ignored(value: str) -> None:
    assert check_declared_length(value, 10) is None
    assert parse_retry_after(value) is None


def test_name_template_that_loses_uniqueness_still_keeps_every_image(
    image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    settings = make_settings("sync", out, image_server.base + "/320/240?lock={i}", 3)
    report = run(settings.replace(name_template="{index:0>200}{ext}"))
    paths = {r.path for r in report.results}
    assert len(paths) == 3 and all(len(str(p)) <= 100 for p in paths)
    assert len([p for p in out.iterdir() if p.suffix == ".jpg"]) == 3


def test_a_run_that_fails_to_start_keeps_the_previous_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"index": 0, "url": "http://h/0", "status": "ok"}\n')
    with pytest.raises(ConfigError), ManifestWriter(tmp_path):
        raise ConfigError("cannot reach the scheduler")
    assert list(read_manifest(tmp_path)) == [0]
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]


def test_retry_failed_without_the_first_count_keeps_every_line(tmp_path: Path) -> None:
    out = tmp_path / "pic"
    assert invoke("-n", "12", "--local", "--out", str(out), "-q")[0] == 0
    code, _, _ = invoke("--local", "--out", str(out), "-q", "--retry-failed")
    assert code == 0
    assert manifest_indices(out) == list(range(12))


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "inf"],
        ["--timeout", "1e300"],
        ["--rate", "1e-300"],
        ["--rate", "nan"],
    ],
)
def test_non_finite_numbers_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    code, _, stderr = invoke(*args, "-n", "1", "--out", str(tmp_path / "pic"))
    assert code == 2 and stderr.startswith("error:") and len(stderr.splitlines()) == 1


def test_local_server_that_cannot_listen_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOWNLOADER_SERVER_HOST", "192.0.2.1")  # TEST-NET: not ours to bind
    code, _, stderr = invoke("-n", "1", "--local", "--out", str(tmp_path / "pic"), "-q")
    assert code == 2 and "could not listen" in stderr and "Traceback" not in stderr


def test_csv_row_the_csv_module_cannot_read_is_a_failed_result(
    image_server: ImageServer, tmp_path: Path
) -> None:
    table = tmp_path / "urls.csv"
    good = f"{image_server.base}/320/240?lock=1"
    table.write_text(f'url,note\n{good},a\n"{good}x,{"y" * 200_000}\n{good},c\n')
    settings = make_settings("threads", tmp_path / "pic", "http://x/{i}", 1)
    report = run(settings.replace(urls=str(table)))
    assert report.ok >= 2 and report.ok + report.failed == len(report.results)
    assert len(read_manifest(tmp_path / "pic")) == len(report.results)


def test_resume_ignores_records_that_point_outside_out(
    image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    out.mkdir()
    (out / MANIFEST).write_text(
        json.dumps({"index": 0, "url": "x", "status": "ok", "path": "../../etc/hostname"})
        + "\n"
        + json.dumps({"index": 1, "url": 5, "status": "ok"})
        + "\n"
    )
    assert read_manifest(out) == {}
    settings = make_settings("sync", out, image_server.base + "/320/240?lock={i}", 2)
    assert run(settings.replace(resume=True)).ok == 2


def test_manifest_that_is_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "pic" / MANIFEST).mkdir(parents=True)
    code, _, stderr = invoke("-n", "1", "--local", "--out", str(tmp_path / "pic"), "-q")
    assert code == 2 and "manifest" in stderr and "Traceback" not in stderr


def test_unique_url_list_all_distinct_exits_zero(image_server: ImageServer, tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{image_server.base}/320/240?lock={i}\n" for i in range(3)))
    code, _, _ = invoke("--urls", str(listing), "--unique", "--out", str(tmp_path / "p"), "-q")
    assert code == 0


def test_compare_refuses_an_unwritable_json_path_before_running() -> None:
    code, stdout, stderr = invoke("compare", "-n", "1", "--json", "/dev/null/x.json")
    assert code == 2 and "not a folder" in stderr and stdout == ""


def test_python_api_rejects_wrong_types_with_config_error() -> None:
    with pytest.raises(ConfigError, match="count must be an integer"):
        download(count="2", progress=False)  # type: ignore[arg-type]


def test_result_from_record_round_trips() -> None:
    result = Result(index=3, url="http://h/3", status="ok", path="000003.jpg", bytes=5)
    assert Result.from_record(result.to_record()) == result


@pytest.fixture
def trickling_headers() -> Iterator[str]:
    """A raw server that sends its status line and headers one byte every 0.1 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Slow: yes\r\n\r\n":
                    if stop.is_set():
                        break
                    with contextlib.suppress(OSError):
                        conn.sendall(bytes([byte]))
                    time.sleep(0.1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg"
    stop.set()
    thread.join(5)
    listener.close()


def test_requests_deadline_covers_trickling_headers(trickling_headers: str) -> None:
    http = HttpSettings(timeout=1.0, retries=0)
    start = time.monotonic()
    with new_session(http) as session, pytest.raises(RetryableFetchError, match="timed out"):
        fetch_sync(session, trickling_headers, http)
    # The headers alone take 6 s to arrive; each byte is well within the read timeout.
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_asyncio_ctrl_c_during_a_write_leaves_no_unrecorded_file(
    image_server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executor: str
) -> None:
    import aiofiles.os

    from downloader import work
    from downloader.storage import write_files

    def slow_write(files: list[tuple[Path, bytes]]) -> None:
        time.sleep(1.0)  # widens the real window: the write is on another thread
        write_files(files)

    if executor == "process":  # the write goes through aiofiles' thread
        monkeypatch.setattr(work, "write_files_async", aiofiles.os.wrap(slow_write))
    else:  # the thumbnail thread writes too (work.save_in)
        monkeypatch.setattr(work, "write_files", slow_write)
    out = tmp_path / "pic"
    settings = make_settings("asyncio", out, image_server.base + "/320/240?lock={i}", 4)
    settings = settings.replace(
        thumbnails=dataclasses.replace(settings.thumbnails, executor=executor)
    )
    timer = threading.Timer(0.6, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        report = run(settings)
    finally:
        timer.cancel()
    assert report.interrupted
    recorded = {r.path for r in read_manifest(out).values() if r.ok}
    on_disk = {p.name for p in out.iterdir() if p.is_file() and p.name not in (MANIFEST, LOCK)}
    assert on_disk == recorded


def test_a_slow_stdin_list_does_not_stall_downloads_in_flight(tmp_path: Path) -> None:
    """The reviewer's case: 3 URLs, a 4 s pause in the producer, 1 more URL, against a
    server with 1 s latency and a 2.5 s timeout. Read on the event loop, the pause froze
    the requests in flight past their deadline (false timeouts)."""
    from downloader.backends.aio import AsyncioBackend
    from downloader.jobs import Job, JobStream

    with server_thread(make_app(ServerSettings(latency_ms=1000))) as server:
        urls = [f"{server.base_url}/320/240?lock={i}" for i in range(4)]

        def slow_stream() -> Iterator[Job]:
            for index, url in enumerate(urls):
                if index == 3:
                    time.sleep(4)
                yield Job(index, url)

        out = tmp_path / "pic"
        prepare_out(out)
        settings = make_settings(
            "asyncio", out, "http://x/{i}", 1, timeout=2.5, retries=0, concurrency=1
        )
        results: list[Result] = []
        jobs = JobStream(slow_stream(), blocking=True)  # a pipe, as `--urls -` is
        AsyncioBackend().run(jobs, settings, results.append, StopToken())
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    assert all(r.ok for r in results), [r.error for r in results]
