"""The service for teams, through aiohttp's test client: /metrics from the store,
priorities, pause and resume, webhooks (jobs run in real child processes, ``local``)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import records
from helpers.service import SMALL, service_client, submit, until
from prometheus_client.parser import text_string_to_metric_families

from downloader.service.keys import SETTINGS, STORE

SLOW = {**SMALL, "server": {"latency_ms": 100}, "http": {"concurrency": 2}}
SECRET = "hook-secret"


async def job_of(client: TestClient[Any, Any], job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = await (await client.get(f"/api/v1/jobs/{job_id}")).json()
    return job


async def in_state(client: TestClient[Any, Any], job_id: str, *states: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = await job_of(client, job_id)
        return job if job["state"] in states else None

    found: dict[str, Any] = await until(check, f"job {job_id} to be {'/'.join(states)}")
    return found


async def ended(client: TestClient[Any, Any], job_id: str) -> dict[str, Any]:
    return await in_state(client, job_id, "done", "failed", "cancelled")


def out_of(client: TestClient[Any, Any], job_id: str) -> Path:
    assert client.server.app is not None
    return Path(client.server.app[SETTINGS].service.data / "jobs" / job_id)


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, str], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[(sample.name, label)] = sample.value
    return samples


# ---------------------------------------------------------------------------- metrics


async def test_metrics_count_every_image_once_across_a_restart(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data")
    job = await submit(client, count=6)
    await ended(client, job["id"])
    failing = await submit(client, count=2, server={"fail_rate": 1.0}, http={"retries": 0})
    await ended(client, failing["id"])
    lines = records(out_of(client, job["id"]))
    first = await scrape(client)
    await client.close()
    assert first[("downloader_images_total", "status=ok")] == 6
    assert first[("downloader_images_total", "status=failed")] == 2
    assert first[("downloader_bytes_total", "")] == sum(r["bytes"] for r in lines)
    assert first[("downloader_fetch_seconds_count", "")] == 8
    assert first[("downloader_fetch_seconds_bucket", "le=+Inf")] == 8
    elapsed = sum(r["elapsed_ms"] for r in lines) / 1000
    assert first[("downloader_fetch_seconds_sum", "")] >= elapsed
    assert first[("downloader_jobs", "state=done")] == 2
    assert first[("downloader_jobs", "state=running")] == 0

    again = await service_client(tmp_path / "data")  # the feeds are read again from the manifests
    try:
        for job_id in (job["id"], failing["id"]):  # a file's request reads its manifest
            assert (await again.get(f"/files/{job_id}/{lines[0]['path']}")).status in (200, 404)
        assert await scrape(again) == first
    finally:
        await again.close()


async def test_metrics_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", token="t0ken")
    try:
        assert (await client.get("/metrics")).status == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer t0ken"})
        assert ok.status == 200 and "downloader_jobs" in await ok.text()
    finally:
        await client.close()


# ---------------------------------------------------------------------------- priority


async def test_queued_jobs_start_highest_priority_first(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", max_jobs=1)
    try:
        blocker = await submit(client, count=40, **SLOW)
        await in_state(client, blocker["id"], "running")
        low = await submit(client, count=1)
        mid = await submit(client, count=1, priority=2)
        high = await submit(client, count=1, priority=5)
        later = await submit(client, count=1, priority=5)
        assert (low["priority"], mid["priority"], high["priority"]) == (0, 2, 5)
        assert "priority" not in high["spec"]
        patched = await client.patch(f"/api/v1/jobs/{low['id']}", json={"priority": 9})
        assert patched.status == 200 and (await patched.json())["priority"] == 9
        busy = await client.patch(f"/api/v1/jobs/{blocker['id']}", json={"priority": 1})
        assert busy.status == 409
        for bad in ({"priority": "high"}, {"priority": True}, {"priority": 1.5}, {"x": 1}):
            assert (await client.patch(f"/api/v1/jobs/{low['id']}", json=bad)).status == 400
        refused = await client.post("/api/v1/jobs", json={**SMALL, "priority": "1"})
        assert refused.status == 400 and "priority" in (await refused.json())["error"]
        assert (await client.delete(f"/api/v1/jobs/{blocker['id']}")).status == 202
        for job in (low, mid, high, later):
            await ended(client, job["id"])
        assert client.server.app is not None
        history = client.server.app[STORE].history()
        started = [t.job_id for t in history if t.state == "running"]
        # low now 9, then the two at 5 oldest first, then mid at 2
        assert started == [blocker["id"], low["id"], high["id"], later["id"], mid["id"]]
    finally:
        await client.close()


# ---------------------------------------------------------------------------- pause


def kept_files(out: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for record in records(out):
        if record["status"] == "ok":
            stat = (out / record["path"]).stat()
            found[record["path"]] = (stat.st_ino, stat.st_mtime_ns)
    return found


def assert_every_file_has_its_line(out: Path) -> None:
    lines = records(out)
    listed = {r["path"] for r in lines if r["path"]} | {
        r["thumbnail"] for r in lines if r["thumbnail"]
    }
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    on_disk = {p for p in on_disk - {"manifest.jsonl"} if not Path(p).name.startswith(".")}
    assert on_disk == listed
    assert not list(out.rglob("*.part"))


async def test_pause_stops_a_job_that_resume_continues(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data")
    job = await submit(client, count=40, **SLOW)
    job_id = job["id"]
    assert (await client.post(f"/api/v1/jobs/{job_id}/resume")).status == 409

    async def fetching() -> bool:
        return bool((await job_of(client, job_id))["ok"] >= 3)

    await until(fetching, "a few images")
    assert (await client.post(f"/api/v1/jobs/{job_id}/pause")).status == 202
    paused = await in_state(client, job_id, "paused")
    assert 3 <= paused["ok"] < 40 and paused["finished_at"] is None
    assert (await client.post(f"/api/v1/jobs/{job_id}/pause")).status == 409
    out = out_of(client, job_id)
    assert_every_file_has_its_line(out)
    kept = kept_files(out)
    await client.close()

    client = await service_client(tmp_path / "data")  # a paused job stays paused across a restart
    try:
        await asyncio.sleep(0.5)
        assert (await job_of(client, job_id))["state"] == "paused"
        resumed = await client.post(f"/api/v1/jobs/{job_id}/resume")
        assert resumed.status == 202 and (await resumed.json())["state"] == "queued"
        done = await ended(client, job_id)
        assert (done["state"], done["ok"], done["failed"]) == ("done", 40, 0)
        after = kept_files(out)
        assert {path: after[path] for path in kept} == kept  # nothing kept fetched again
        assert (await client.post(f"/api/v1/jobs/{job_id}/pause")).status == 409
        assert client.server.app is not None
        states = [t.state for t in client.server.app[STORE].history(job_id)]
        assert states == ["queued", "running", "paused", "queued", "running", "done"]
    finally:
        await client.close()


async def test_a_queued_job_pauses_and_a_paused_one_cancels(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", max_jobs=1)
    try:
        blocker = await submit(client, count=40, **SLOW)
        waiting = await submit(client, count=1)
        assert (await client.post(f"/api/v1/jobs/{waiting['id']}/pause")).status == 202
        assert (await job_of(client, waiting["id"]))["state"] == "paused"
        assert (await client.delete(f"/api/v1/jobs/{blocker['id']}")).status == 202
        await ended(client, blocker["id"])
        await asyncio.sleep(0.3)
        assert (await job_of(client, waiting["id"]))["state"] == "paused"  # not started
        assert (await client.delete(f"/api/v1/jobs/{waiting['id']}")).status == 202
        assert (await job_of(client, waiting["id"]))["state"] == "cancelled"
        assert (await client.post(f"/api/v1/jobs/{waiting['id']}/resume")).status == 409
    finally:
        await client.close()


# ---------------------------------------------------------------------------- webhooks


class Receiver:
    """A webhook receiver on loopback: answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.got: list[tuple[bytes, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((await request.read(), dict(request.headers)))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hooks = Receiver([503, 500])
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    server = TestServer(app)
    await server.start_server()
    yield hooks, str(server.make_url("/hook"))
    await server.close()


async def test_a_webhook_is_signed_and_retried_until_delivered(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    client = await service_client(tmp_path / "data", allow_private=True, webhook_secret=SECRET,
                         token="t0ken")  # fmt: skip
    auth = {"Authorization": "Bearer t0ken"}
    try:
        response = await client.post("/api/v1/jobs", json={**SMALL, "count": 2, "webhook": url},
                                     headers=auth)  # fmt: skip
        job_id = (await response.json())["id"]

        async def delivered() -> dict[str, Any] | None:
            job: dict[str, Any] = await (await client.get(f"/api/v1/jobs/{job_id}",
                                                          headers=auth)).json()  # fmt: skip
            return job if (job["delivery"] or {}).get("state") == "delivered" else None

        job = await until(delivered, "the webhook's delivery")
        assert job["webhook"] == url and job["delivery"]["attempts"] == 3
        assert job["delivery"]["status"] == 200 and "webhook" not in job["spec"]
        assert len(hooks.got) == 3
        body, headers = hooks.got[-1]
        expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Downloader-Signature"] == f"sha256={expected}"
        assert "t0ken" not in json.dumps(headers) and b"t0ken" not in body
        sent = json.loads(body)
        assert sent["id"] == job_id and sent["state"] == "done" and sent["ok"] == 2
        assert {k: v for k, v in sent.items() if k != "delivery"} == {
            k: v for k, v in job.items() if k != "delivery"
        }
    finally:
        await client.close()


async def test_a_webhook_to_a_private_address_is_refused(
    tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks, url = receiver
    client = await service_client(tmp_path / "data")
    try:
        garbage = ("http://[::1", f"http://{'a' * 64}.example/", "http://\u00ff\u2028/")
        for bad in (url, "http://localhost:9/x", "ftp://example.com/", "nope", 7, *garbage):
            response = await client.post("/api/v1/jobs", json={**SMALL, "webhook": bad})
            assert response.status == 400, bad
            assert "webhook" in (await response.json())["error"]
        refused = await client.post("/api/v1/jobs", json={**SMALL, "webhook": url})
        assert "--allow-private" in (await refused.json())["error"]

        async def passes(url: Any, allow_private: bool) -> Any:
            return url

        # Past the check at submit (a name that resolved to a public address then), the
        # address connected to is checked again.
        monkeypatch.setattr("downloader.service.api.check_url", passes)
        job = await submit(client, count=1, webhook=url)

        async def given_up() -> dict[str, Any] | None:
            found = await job_of(client, job["id"])
            return found if (found["delivery"] or {}).get("state") == "failed" else None

        failed = await until(given_up, "the delivery to fail")
        assert "refused" in failed["delivery"]["error"] and failed["delivery"]["attempts"] == 1
        assert hooks.got == []
    finally:
        await client.close()


# ---------------------------------------------------------------------------- logins


async def test_ten_wrong_tokens_a_minute_and_the_login_answers_429(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", token="t0ken")
    try:
        for _ in range(10):
            wrong = await client.post("/api/v1/login", json={"token": "guess"})
            assert wrong.status == 401
        for token in ("guess", "t0ken"):  # the right one too, until the minute is over
            limited = await client.post("/api/v1/login", json={"token": token})
            assert limited.status == 429
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            assert "too many wrong tokens" in (await limited.json())["error"]
    finally:
        await client.close()


async def test_wrong_bearer_tokens_count_against_the_limit_too(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", token="t0ken")
    try:
        for _ in range(3):  # a page not logged in sends no token: not a guess
            assert (await client.get("/api/v1/jobs")).status == 401
        for _ in range(10):
            guess = await client.get("/api/v1/jobs", headers={"Authorization": "Bearer guess"})
            assert guess.status == 401
        right = {"Authorization": "Bearer t0ken"}
        limited = await client.get("/api/v1/jobs", headers=right)
        assert limited.status == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
        assert (await client.post("/api/v1/login", json={"token": "t0ken"})).status == 429
    finally:
        await client.close()


def test_the_login_limit_forgets_after_a_minute() -> None:
    from downloader.service.logins import LoginLimit

    now = [1000.0]
    limit = LoginLimit(clock=lambda: now[0])
    for _ in range(9):
        limit.wrong("192.0.2.1")
        now[0] += 1
    assert limit.retry_after("192.0.2.1") is None  # nine: not yet
    limit.wrong("192.0.2.1")
    assert limit.retry_after("192.0.2.1") == 51  # the first leaves the window at 1060
    assert limit.retry_after("192.0.2.2") is None  # one address's guesses only
    now[0] = 1060.0
    assert limit.retry_after("192.0.2.1") is None
