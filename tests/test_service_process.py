"""The job service as a real process: kill -9 and restart, SIGTERM, --max-jobs, the
security checks at start, and `download submit --wait` exit codes."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import requests
from helpers import child_env, download_command, records, service_process, wait_for

TOKEN = "process-test-token"
SLOW = {"local": True, "thumbnails": {"size": 32}, "http": {"concurrency": 2},
        "server": {"latency_ms": 100}}  # fmt: skip


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    data: Path
    token: str | None

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.call("GET", f"/api/v1/jobs/{job_id}").json()
        return job

    def submit(self, **body: Any) -> str:
        response = self.call("POST", "/api/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    def finished(self, job_id: str) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["state"] in ("done", "failed", "cancelled") else None

        result: dict[str, Any] = wait_for(ended, f"job {job_id} to end", seconds=90)
        return result


@contextlib.contextmanager
def service(data: Path, *args: str, token: str | None = None) -> Iterator[Service]:
    with service_process(data, *args, token=token) as running:
        yield Service(running.proc, running.url, running.log, data, token)


def job_pid(data: Path, job_id: str) -> int:
    with contextlib.closing(sqlite3.connect(data / "jobs.sqlite")) as db:
        pid: int = db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    return pid


def history(data: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(data / "jobs.sqlite")) as db:
        return db.execute("SELECT job_id, state FROM history ORDER BY seq").fetchall()


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def ok_files(out: Path) -> dict[str, tuple[int, int]]:
    """Each image the manifest shows ok, with its inode and mtime (a refetch replaces both)."""
    found = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record["status"] == "ok":
                stat = (out / record["path"]).stat()
                found[record["path"]] = (stat.st_ino, stat.st_mtime_ns)
    return found


def test_kill_9_mid_job_then_restart_finishes_without_refetching(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with service(data, "--max-jobs", "1", token=TOKEN) as first:
        job_id = first.submit(count=40, **SLOW)
        waiting = first.submit(count=2, local=True, thumbnails={"size": 0})
        wait_for(lambda: first.job(job_id)["ok"] >= 6, "a few images")
        pid = job_pid(data, job_id)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"DOWNLOADER_SERVICE_TOKEN" not in environ and TOKEN.encode() not in environ
        first.proc.kill()
        first.proc.wait(30)
        wait_for(lambda: gone(pid), "the job's process to stop with the service")
    kept = ok_files(data / "jobs" / job_id)
    assert len(kept) >= 6
    with service(data, "--max-jobs", "1", token=TOKEN) as second:
        job = second.finished(job_id)
        assert (job["state"], job["ok"], job["failed"]) == ("done", 40, 0)
        assert second.finished(waiting)["ok"] == 2  # the queued job stayed queued, then ran
    after = ok_files(data / "jobs" / job_id)
    assert len(after) == 40
    assert {path: after[path] for path in kept} == kept  # not one kept image fetched again
    states = [state for job, state in history(data) if job == job_id]
    assert states == ["queued", "running", "queued", "running", "done"]
    assert [state for job, state in history(data) if job == waiting] == [
        "queued", "running", "done"
    ]  # fmt: skip


def test_sigterm_stops_the_service_and_its_jobs_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with service(data) as svc:
        job_id = svc.submit(count=60, **SLOW)
        wait_for(lambda: svc.job(job_id)["ok"] >= 2, "a few images")
        pid = job_pid(data, job_id)
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(60) == 0
        assert gone(pid)
    with contextlib.closing(sqlite3.connect(data / "jobs.sqlite")) as db:
        assert db.execute("SELECT state FROM jobs").fetchone()[0] == "queued"
    out = data / "jobs" / job_id
    assert not list(out.rglob("*.part"))
    names = {r["path"] for r in records(out) if r["path"]}
    assert {p.name for p in out.glob("*.jpg")} == names  # every file has its line


def test_max_jobs_is_never_exceeded(tmp_path: Path, image_server: Any) -> None:
    data = tmp_path / "data"
    # URL lists on the tests' own server (hence --allow-private): no built-in server to
    # start per job.
    urls = [f"{image_server.base}/64/48?lock={i}" for i in range(2)]
    with service(data, "--max-jobs", "2", "--allow-private") as svc:
        ids = [svc.submit(urls=urls, backend="sync", thumbnails={"size": 0}) for _ in range(8)]
        jobs = [svc.finished(job_id) for job_id in ids]
    assert [(job["state"], job["ok"]) for job in jobs] == [("done", 2)] * 8
    running, most = set(), 0
    for job_id, state in history(data):
        (running.add if state == "running" else running.discard)(job_id)
        most = max(most, len(running))
    assert most == 2
    starts = [job_id for job_id, state in history(data) if state == "running"]
    assert starts == ids  # in the order they came


def test_start_refuses_unsafe_or_busy_setups(tmp_path: Path) -> None:
    command = download_command()
    exposed = subprocess.run([*command, "service", "--host", "0.0.0.0", "--data", str(tmp_path)],
                             capture_output=True, env=child_env(), timeout=60)  # fmt: skip
    assert exposed.returncode == 2
    assert exposed.stderr.decode().strip().splitlines() == [
        "error: listening on 0.0.0.0 needs a token (--token or DOWNLOADER_SERVICE_TOKEN)"
    ]
    with service(tmp_path / "data") as svc:
        busy = subprocess.run([*command, "service", "--port", "0", "--data", str(svc.data)],
                              capture_output=True, env=child_env(), timeout=60)  # fmt: skip
        assert busy.returncode == 2
        assert f"is in use by another service (pid {svc.proc.pid})" in busy.stderr.decode()


def test_submit_wait_exits_with_the_jobs_code(tmp_path: Path) -> None:
    with service(tmp_path / "data") as svc:

        def submit(*args: str) -> subprocess.CompletedProcess[str]:
            command = [*download_command(), "submit", "--service", svc.url, "--wait", *args]
            return subprocess.run(command, capture_output=True, text=True, env=child_env(),
                                  timeout=120)  # fmt: skip

        ok = submit("-n", "3", "--local", "--thumbnail-size", "0")
        assert ok.returncode == 0, ok.stderr
        job = svc.job(ok.stdout.splitlines()[0])
        assert (job["state"], job["ok"], job["spec"]["count"]) == ("done", 3, 3)
        some_failed = submit("-n", "2", "--local", "--corrupt-rate", "1")
        assert some_failed.returncode == 1
        refused = submit("-n", "0", "--local")
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            "error: the service refused the job: count must be at least 1, got 0"
        )
        assert submit("--out", "x", "--local").returncode == 2
        command = [*download_command(), "submit", "--service", svc.url, "--wait", "-n", "100",
                   "--local", "--latency-ms", "200", "--concurrency", "1"]  # fmt: skip
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=child_env()) as waiting:  # fmt: skip
            assert waiting.stdout is not None
            job_id = waiting.stdout.readline().decode().strip()
            wait_for(lambda: svc.job(job_id)["state"] == "running", "the job to run")
            assert svc.call("DELETE", f"/api/v1/jobs/{job_id}").status_code == 202
            assert waiting.wait(60) == 130


class _Hooks(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[tuple[bytes, dict[str, str]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.got.append((body, dict(self.headers)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_pending_webhook_is_delivered_after_kill_9_and_a_restart(tmp_path: Path) -> None:
    data, secret = tmp_path / "data", "hook-secret"
    with socket.socket() as probe:  # a port nobody listens on yet: deliveries fail
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ("--allow-private", "--webhook-secret", secret)
    with service(data, *args, token=TOKEN) as first:
        job_id = first.submit(count=2, local=True, webhook=f"http://127.0.0.1:{port}/hook")
        first.finished(job_id)
        pending = wait_for(lambda: (first.job(job_id)["delivery"] or {}).get("attempts"),
                           "a failed delivery")  # fmt: skip
        assert first.job(job_id)["delivery"]["state"] == "pending" and pending >= 1
        first.proc.kill()
        first.proc.wait(30)
    _Hooks.got.clear()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with service(data, *args, token=TOKEN) as second:
            wait_for(lambda: _Hooks.got, "the delivery after the restart")
            body, headers = _Hooks.got[0]
            expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Downloader-Signature"] == f"sha256={expected}"
            assert "Authorization" not in headers and TOKEN.encode() not in body
            sent = json.loads(body)
            assert (sent["id"], sent["state"], sent["ok"]) == (job_id, "done", 2)
            job = wait_for(
                lambda: (j := second.job(job_id))["delivery"]["state"] == "delivered" and j,
                "the delivery to be recorded",
            )
            assert job["delivery"]["status"] == 204 and job["delivery"]["attempts"] >= 1
            assert len(_Hooks.got) == 1
    finally:
        receiver.shutdown()
        receiver.server_close()
