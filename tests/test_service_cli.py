"""`download jobs`, `pause`, `resume`, `cancel`, `retry` and `submit --priority/--webhook`
against a real service process: exit 0 on success, one line and exit 2 otherwise."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest
from helpers import child_env, download_command, service_process, wait_for

TOKEN = "cli-test-token"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("service") / "data"
    with service_process(data, "--max-jobs", "1", token=TOKEN) as running:
        yield running.url


def download(url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = child_env(**({"DOWNLOADER_SERVICE_TOKEN": token} if token else {}))
    return subprocess.run(
        [*download_command(), *args, "--service", url], capture_output=True, text=True,
        env=env, timeout=120,
    )  # fmt: skip


def one_line_error(run: subprocess.CompletedProcess[str], *words: str) -> None:
    assert run.returncode == 2, run
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in run.stderr


def state_of(url: str, job_id: str) -> str:
    listed = download(url, "jobs")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    return line.split()[1]


def test_the_job_commands_drive_a_job(url: str) -> None:
    slow = ["submit", "--local", "-n", "40", "--latency-ms", "100", "--concurrency", "2"]
    first = download(url, *slow, "--priority", "3")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip()
    wait_for(lambda: state_of(url, job_id) == "running", "the job to run")
    listed = download(url, "jobs", "--state", "running")
    assert listed.stdout.startswith(job_id) and "priority 3" in listed.stdout
    assert download(url, "pause", job_id).returncode == 0
    wait_for(lambda: state_of(url, job_id) == "paused", "the job to pause")
    one_line_error(download(url, "pause", job_id), "paused")
    assert download(url, "resume", job_id).returncode == 0
    assert download(url, "cancel", job_id).returncode == 0
    wait_for(lambda: state_of(url, job_id) == "cancelled", "the job to be cancelled")
    assert download(url, "retry", job_id).returncode == 0
    assert state_of(url, job_id) in ("queued", "running")
    assert download(url, "cancel", job_id).returncode == 0


def test_bad_requests_are_one_line_errors(url: str) -> None:
    one_line_error(download(url, "pause", "no-such-job"), "no job 'no-such-job'")
    one_line_error(download(url, "jobs", token="wrong"), "token")
    one_line_error(download(url, "jobs", "--state", "sleeping"))
    one_line_error(download(url, "resume"), "ID")
    one_line_error(download(url, "submit", "--local", "--priority", "x"), "priority")
    one_line_error(
        download(url, "submit", "--local", "--webhook", "http://127.0.0.1:9/"), "webhook"
    )
    one_line_error(download("http://127.0.0.1:9", "jobs"), "cannot reach")


def test_submit_offers_only_what_a_service_accepts() -> None:
    shown = subprocess.run(
        [*download_command(), "submit", "--help"], capture_output=True, text=True,
        env=child_env(), timeout=60,
    ).stdout  # fmt: skip
    options = set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", shown, re.MULTILINE))
    assert {"--priority", "--webhook", "--wait", "--count", "--local"} <= options
    assert not options & {"--out", "--resume", "--retry-failed"}
