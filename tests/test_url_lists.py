"""URL lists: a file, a CSV/TSV table or stdin, read as a stream; a bad line or an unusable
host is a failed result, and a slow producer does not stall the downloads in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ImageServer, by_index, invoke, make_settings, records

from downloader import StopToken
from downloader.errors import ConfigError
from downloader.jobs import Job, JobStream, UrlList
from downloader.manifest import read_manifest
from downloader.pipeline import run
from downloader.result import Result
from downloader.server import make_app, server_thread
from downloader.settings import ServerSettings
from downloader.storage import prepare_out


def test_url_list_file_skips_comments_and_reports_bad_lines(
    image_server: ImageServer, tmp_path: Path
) -> None:
    base = image_server.base
    listing = tmp_path / "urls.txt"
    listing.write_text(
        f"# my images\n{base}/320/240?lock=1\n\n   \nnot a url\n{base}/320/240?lock=2\n"
        "ftp://example.com/x.jpg\n"
    )
    settings = make_settings("threads", tmp_path / "out", "http://unused/{i}", 1)
    report = run(settings.replace(urls=str(listing)))
    by_index = {line["index"]: line for line in records(tmp_path / "out")}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert [by_index[i]["status"] for i in range(4)] == ["ok", "failed", "ok", "failed"]
    assert "http://" in str(by_index[1]["error"]) and "not a url" in str(by_index[1]["error"])
    assert (report.ok, report.failed) == (2, 2)


@pytest.mark.parametrize("delimiter, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_url_list_table_uses_the_url_column(
    image_server: ImageServer, tmp_path: Path, delimiter: str, suffix: str
) -> None:
    base = image_server.base
    table = tmp_path / f"urls{suffix}"
    rows = [["name", "URL"], ["a", f"{base}/320/240?lock=3"], ["b", f"{base}/320/240?lock=4"]]
    table.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    assert [job.url for job in UrlList(str(table)).jobs()] == [rows[1][1], rows[2][1]]
    report = run(
        make_settings("sync", tmp_path / "out", "http://x/{i}", 1).replace(urls=str(table))
    )
    assert report.ok == 2


def test_url_list_without_url_column_is_a_config_error(tmp_path: Path) -> None:
    table = tmp_path / "urls.csv"
    table.write_text("name,link\na,http://x/1\n")
    with pytest.raises(ConfigError, match="no 'url' column"):
        UrlList(str(table))


def test_url_list_from_stdin(image_server: ImageServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = f"{image_server.base}/320/240?lock=5\n# skip\n{image_server.base}/320/240?lock=6\n"
    result = invoke("--urls", "-", "--out", str(out), "-q", input=text)
    assert result.exit_code == 0, result.output + result.stderr
    assert len(records(out)) == 2


def test_url_list_is_streamed_not_loaded(tmp_path: Path) -> None:
    """Cut the list short after the first job is out: a streaming reader sees the cut (it
    has read at most a buffer ahead), one that loaded the whole list first does not."""
    listing = tmp_path / "urls.txt"
    lines = [f"http://h/{i:06d}.jpg\n" for i in range(100_000)]
    listing.write_text("".join(lines))
    jobs = UrlList(str(listing)).jobs()
    assert next(jobs).url == "http://h/000000.jpg"
    with open(listing, "r+") as fh:
        fh.truncate(len("".join(lines[:20_000])))
    rest = sum(1 for _ in jobs)
    assert 20_000 - 1 <= rest < 21_000  # a read buffer's worth of slack at most


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_unusable_host_in_a_list_is_a_failed_result(
    backend: str, image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{image_server.base}/320/240?lock=1\nhttp://a..b/x.jpg\nhttp://h:99999/\n")
    result = invoke("--backend", backend, "--urls", str(listing), "--out", str(out), "-q")
    code, stderr = result.exit_code, result.stderr
    assert code == 1 and "Traceback" not in stderr
    assert sorted(by_index(records(out))) == [0, 1, 2]  # the good image has its line


def test_csv_row_the_csv_module_cannot_read_is_a_failed_result(
    image_server: ImageServer, tmp_path: Path
) -> None:
    table = tmp_path / "urls.csv"
    good = f"{image_server.base}/320/240?lock=1"
    table.write_text(f'url,note\n{good},a\n"{good}x,{"y" * 200_000}\n{good},c\n')
    settings = make_settings("threads", tmp_path / "pic", "http://x/{i}", 1)
    report = run(settings.replace(urls=str(table)))
    assert report.ok >= 2 and report.ok + report.failed == len(report.results)
    # The bad row keeps its index (1) as a failure; the row after it is still read.
    assert {r.index: r.status for r in report.results} == {0: "ok", 1: "failed", 2: "ok"}
    manifest = read_manifest(tmp_path / "pic")
    assert len(manifest) == len(report.results)
    assert manifest[1].status == "failed" and manifest[1].url == ""


def test_a_slow_stdin_list_does_not_stall_downloads_in_flight(tmp_path: Path) -> None:
    """A producer that writes 3 URLs, then says nothing until their downloads have ended,
    then writes 1 more (a pipe on stdin, as `--urls -` is). Taken on the event loop, the
    wait would freeze the requests in flight past their 2.5 s deadline (false timeouts),
    and their results, which the producer waits for, would never come: it gives up after
    10 s, longer than the deadline, so that case fails instead of hanging."""
    from downloader.backends.aio import AsyncioBackend

    three_done = threading.Event()
    waited: list[bool] = []
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        if len(results) >= 3:
            three_done.set()

    with server_thread(make_app(ServerSettings(latency_ms=200))) as server:
        urls = [f"{server.base_url}/320/240?lock={i}" for i in range(4)]

        def slow_stream() -> Iterator[Job]:
            for index, url in enumerate(urls):
                if index == 3:
                    waited.append(three_done.wait(10))
                yield Job(index, url)

        out = tmp_path / "pic"
        prepare_out(out)
        settings = make_settings(
            "asyncio", out, "http://x/{i}", 1, timeout=2.5, retries=0, concurrency=1
        )
        jobs = JobStream(slow_stream(), blocking=True)  # a pipe, as `--urls -` is
        AsyncioBackend().run(jobs, settings, emit, StopToken())
    assert waited == [True], "the producer's wait held back the downloads in flight"
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    assert all(r.ok for r in results), [r.error for r in results]


def test_resuming_a_url_list_says_what_it_keeps(image_server: ImageServer, tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{image_server.base}/320/240?lock={i}\n" for i in range(3)))
    args = ["--urls", str(listing), "--out", str(tmp_path / "out"), "-q", "--thumbnail-size", "0"]
    assert invoke(*args).exit_code == 0
    again = invoke(*args, "--resume")
    assert again.exit_code == 0
    assert "resuming: 3 images kept, the rest of the list to fetch" in again.output
    assert "None" not in again.output
