"""Robustness: injected faults, kill -9 then --resume, --retry-failed, and bad input at the
CLI (stopping a run: test_stopping; a throttling host: test_politeness; the request
deadline: test_deadline).

Everything talks to a server on a loopback port. Nothing waits a fixed time for something
to happen: the tests poll with a deadline and assert on behaviour (what was requested, in
which order, what ended up on disk), never on absolute durations.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from helpers import (
    BACKENDS,
    CountingRoute,
    alive,
    assert_files_whole,
    assert_no_temp_files,
    assert_ok_files_match,
    by_index,
    entry_key,
    jpeg,
    make_settings,
    manifest_text,
    records,
    run_cli,
    server_stats,
    settled_lines,
    under_way,
    wait_for,
)

from downloader.cli import main as cli_main
from downloader.pipeline import run
from downloader.server import RunningServer, choose_fault, make_app, server_thread
from downloader.settings import ServerSettings
from downloader.storage import MANIFEST

# ---------------------------------------------------------------------------- helpers


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- 1. faults


FAULTY = ServerSettings(
    seed=8,  # 1 stall among the 200 URLs: each costs the sync backend one whole timeout
    fail_rate=0.10,
    throttle_rate=0.05,
    reset_rate=0.05,
    truncate_rate=0.05,
    stall_rate=0.02,
    retry_after=0,
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_image_survives_injected_faults(backend: str, tmp_path: Path) -> None:
    count = 200
    out = tmp_path / "pic"
    expected = {i: choose_fault(FAULTY, entry_key(i)) for i in range(count)}
    with server_thread(make_app(FAULTY)) as server:
        url = server.base_url + "/{width}/{height}?lock={i}"
        report = run(make_settings(backend, out, url, count, timeout=1.0, retries=3))
        counts = server_stats(server)
        served: dict[str, bytes] = {}
        lines = by_index(records(out))
        for line in lines.values():
            if line["status"] == "ok" and line["final_url"] not in served:
                served[line["final_url"]] = get_bytes(line["final_url"])

    failures = {i: line["error"] for i, line in lines.items() if line["status"] != "ok"}
    assert failures == {}
    assert (report.ok, report.failed) == (count, 0)
    assert sorted(lines) == list(range(count))
    for index, line in lines.items():
        data = (out / line["path"]).read_bytes()
        assert data == served[line["final_url"]], index
        assert sha(data) == line["sha256"]
        if expected[index] is not None:  # the first attempt was broken: the bytes are a retry's
            assert line["attempts"] >= 2, (index, expected[index])
    assert_no_temp_files(out)

    # The faults really were injected, each on exactly the URLs the seed picks for it.
    injected = {kind: n for kind, n in Counter(expected.values()).items() if kind is not None}
    assert set(injected) == {"fail", "throttle", "reset", "truncate", "stall"}
    for kind, n in injected.items():
        assert counts[f"fault:{kind}"] == n, kind
    assert counts["entry"] >= count + sum(injected.values())


# ---------------------------------------------------------------------------- 2. kill -9


@pytest.mark.parametrize("backend", ["asyncio", "processes", "hybrid"])
def test_kill_9_then_resume_fetches_only_what_is_missing(backend: str, tmp_path: Path) -> None:
    count = 120
    with under_way(backend, tmp_path, count, lines=20, seed=5) as live:
        out, proc = live.out, live.proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        killed = by_index(records(out))  # every complete line is valid JSON
        assert 20 <= len(killed) < count, "the kill should land mid-run"
        assert_files_whole(out, killed)
        kept = {i for i, line in killed.items() if line["status"] == "ok"}

        before = server_stats(live.server)
        resumed = run_cli([*live.args, "--resume"], tmp_path)
        after = server_stats(live.server)

    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert f"{len(kept)} kept" in resumed.stdout
    lines = settled_lines(out)  # the killed run's temp files were swept
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())
    assert_files_whole(out, lines)

    again = {i for i in range(count) if after[entry_key(i)] != before[entry_key(i)]}
    assert again & kept == set(), "an image recorded ok was fetched again"
    assert again == set(range(count)) - kept, "every image not recorded ok is fetched"

    # The pool workers and the forkserver of the killed run did not outlive it.
    wait_for(lambda: not any(alive(pid) for pid in live.tree), "the killed run's children to exit")


# ---------------------------------------------------------------------------- 3. retry/resume


class Flip(CountingRoute):
    """``/flip/{i}``: odd indices answer 404 until ``healed``; counts every request."""

    route = "/flip/{i}"

    def __init__(self) -> None:
        super().__init__()
        self.healed = False

    async def answer(self, index: int) -> web.Response:
        if index % 2 and not self.healed:
            raise web.HTTPNotFound(text="not yet")
        return web.Response(body=jpeg(index % 7), content_type="image/jpeg")


@pytest.fixture
def flip() -> Iterator[tuple[Flip, RunningServer]]:
    state = Flip()
    with server_thread(state.app()) as server:
        yield state, server


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_failed_requests_only_the_failed(
    backend: str, flip: tuple[Flip, RunningServer], tmp_path: Path
) -> None:
    state, server = flip
    count = 12
    out = tmp_path / "pic"
    settings = make_settings(backend, out, server.base_url + "/flip/{i}", count)
    first = run(settings)
    assert (first.ok, first.failed) == (count // 2, count // 2)
    failed = {i for i, line in by_index(records(out)).items() if line["status"] != "ok"}
    assert failed == set(range(1, count, 2))

    state.healed = True
    before = state.hits.copy()
    second = run(settings.replace(retry_failed=True))

    requested = {i for i in range(count) if state.hits[i] != before[i]}
    assert requested == failed
    assert all(state.hits[i] - before[i] == 1 for i in failed)
    assert (second.ok, second.failed, second.skipped) == (len(failed), 0, count - len(failed))
    lines = by_index(records(out))
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())
    assert_ok_files_match(out, lines)


def test_retry_failed_keeps_a_line_for_every_index(
    flip: tuple[Flip, RunningServer], tmp_path: Path
) -> None:
    state, server = flip
    count = 6
    out = tmp_path / "pic"
    settings = make_settings("sync", out, server.base_url + "/flip/{i}", count)
    run(settings)
    first = by_index(records(out))
    (out / first[0]["path"]).unlink()  # an ok image whose file was deleted since

    state.healed = True
    run(settings.replace(retry_failed=True))

    # Whether index 0 is fetched again or its old line kept, the manifest still covers it.
    assert sorted(by_index(records(out))) == list(range(count))


def test_resume_refetches_only_missing_altered_and_torn(
    flip: tuple[Flip, RunningServer], tmp_path: Path
) -> None:
    state, server = flip
    state.healed = True
    count = 10
    out = tmp_path / "pic"
    settings = make_settings("threads", out, server.base_url + "/flip/{i}", count)
    assert run(settings).ok == count

    text = manifest_text(out)
    lines = text.splitlines()
    torn = json.loads(lines[-1])["index"]
    # Tear the last line as a crash mid-write would: half of it, no newline.
    (out / MANIFEST).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    deleted, altered, no_thumb = [i for i in range(count) if i != torn][:3]
    old = by_index(records(out))
    (out / old[deleted]["path"]).unlink()
    altered_path = out / old[altered]["path"]
    altered_path.write_bytes(altered_path.read_bytes()[:-10] + b"\0" * 10)
    (out / old[no_thumb]["thumbnail"]).unlink()

    before = state.hits.copy()
    report = run(settings.replace(resume=True))

    requested = {i for i in range(count) if state.hits[i] != before[i]}
    assert requested == {torn, deleted, altered, no_thumb}
    assert (report.ok, report.failed, report.skipped) == (4, 0, count - 4)
    lines_after = settled_lines(out)
    assert sorted(lines_after) == list(range(count))
    assert all(line["status"] == "ok" for line in lines_after.values())
    assert_files_whole(out, lines_after)


# ---------------------------------------------------------------------------- 4. bad input

# tests/test_settings_cli.py covers count, backend, config files, concurrency, timeout,
# URL scheme and placeholders, OUT as a file, env, unknown flag, size and retries.
MORE_BAD_INPUTS = [
    pytest.param(["--out", "afile/sub"], "afile/sub", id="out-under-a-file"),
    pytest.param(["--out", "/proc/self/pic"], "/proc/self/pic", id="out-under-proc"),
    pytest.param(["--out", "/sys/kernel"], "/sys/kernel", id="out-not-writable"),
    pytest.param(["--out", "/dev/null"], "/dev/null", id="out-is-a-device"),
    pytest.param(["--rate", "abc"], "abc", id="rate-not-a-number"),
    pytest.param(["--rate", "5/m"], "5/m", id="rate-per-minute"),
    pytest.param(["--rate", "-1"], "http.rate", id="rate-negative"),
    pytest.param(["--fail-rate", "2"], "fail_rate", id="fail-rate-over-1"),
    pytest.param(["--stall-rate", "-0.1"], "stall_rate", id="stall-rate-negative"),
    pytest.param(["--fail-rate", "0.6", "--reset-rate", "0.6"], "add up", id="rates-over-1"),
    pytest.param(["--latency-ms", "-5"], "latency_ms", id="latency-negative"),
    pytest.param(["--timeout", "0"], "timeout", id="timeout-zero"),
    pytest.param(["--size", "0x10"], "width", id="size-zero"),
    pytest.param(["--thumbnail-size", "-1"], "thumbnails.size", id="thumbnail-size-negative"),
    pytest.param(["--url", "http://h/{i"], "template", id="url-unclosed-brace"),
    pytest.param(["--url", "http:///{i}"], "host", id="url-no-host"),
    pytest.param(["--url", "ftp://h/{i}"], "http", id="url-ftp"),
    pytest.param(["--url", "http://h/{i:>5}"], "spaces", id="url-format-spec-spaces"),
    pytest.param(["--config", "cdir"], "cdir", id="config-is-a-folder"),
    pytest.param(["--config", "latin1.toml"], "UTF-8", id="config-not-utf8"),
]


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scrubbed_env: None) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("I am a file, not a folder\n")
    (tmp_path / "cdir").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b'keywords = "caf\xe9"\n')
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize(("args", "fragment"), MORE_BAD_INPUTS)
def test_more_bad_input_is_one_error_line(scratch: Path, args: list[str], fragment: str) -> None:
    before = snapshot(scratch)
    result = CliRunner().invoke(cli_main, args)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(scratch) == before  # no OUT, no manifest, nothing changed


def test_bad_input_through_the_real_console_script(scratch: Path) -> None:
    result = run_cli(["--rate", "abc", "--out", "pic"], scratch)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert not (scratch / "pic").exists()
