"""The job service's HTTP API, through aiohttp's test client (jobs run in real child
processes against their own built-in server: ``local`` jobs, small counts)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import records
from helpers.service import SMALL, service_client, submit, until
from sseclient import Event as SSEEvent
from sseclient import SSEClient

from downloader.service.keys import SETTINGS, STORE

TOKEN = "s3cret-token"


async def finished(client: TestClient[Any, Any], job_id: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = await (await client.get(f"/api/v1/jobs/{job_id}")).json()
        return job if job["state"] in ("done", "failed", "cancelled") else None

    result: dict[str, Any] = await until(ended, f"job {job_id} to end")
    return result


async def read_stream(
    client: TestClient[Any, Any], path: str, headers: dict[str, str] | None = None
) -> list[SSEEvent]:
    """Every event of a stream that ends by itself (a job's stream ends at ``end``)."""
    async with client.get(path, headers=headers) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        body = await response.read()
    return list(SSEClient(iter([body])).events())


async def sse(client: TestClient[Any, Any], path: str) -> list[tuple[str, Any]]:
    return [(event.event, json.loads(event.data)) for event in await read_stream(client, path)]


async def test_a_job_runs_to_done_and_its_results_replay(client: TestClient[Any, Any]) -> None:
    job = await submit(client, count=6)
    assert job["state"] == "queued" and job["total"] == 6
    assert job["spec"] == {**SMALL, "count": 6}
    assert 10 <= len(job["id"]) <= 32
    done = await finished(client, job["id"])
    assert (done["state"], done["ok"], done["failed"]) == ("done", 6, 0)
    assert done["started_at"] and done["finished_at"].endswith("Z") and done["summary"]
    lines = (await (await client.get(f"/api/v1/jobs/{job['id']}/manifest")).text()).splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(6))
    events = await sse(client, f"/api/v1/jobs/{job['id']}/events")  # a late client
    results = [data["index"] for kind, data in events if kind == "result"]
    assert sorted(results) == list(range(6))  # every result, once each
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done"
    record = json.loads(lines[0])
    image = await client.get(f"/files/{job['id']}/{record['path']}")
    assert image.status == 200 and image.headers["Content-Type"] == "image/jpeg"
    assert len(await image.read()) == record["bytes"]
    thumb = await client.get(f"/files/{job['id']}/{record['thumbnail']}")
    assert thumb.status == 200
    listed = await (await client.get("/api/v1/jobs?state=done&limit=5")).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    health = await (await client.get("/api/v1/health")).json()
    assert health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0


async def test_a_client_following_a_running_job_misses_nothing(
    client: TestClient[Any, Any],
) -> None:
    job = await submit(client, count=40, server={"latency_ms": 100}, http={"concurrency": 2})

    async def some_done() -> bool:
        state = await (await client.get(f"/api/v1/jobs/{job['id']}")).json()
        return bool(state["ok"] >= 3)

    await until(some_done, "a few images")
    events = await sse(client, f"/api/v1/jobs/{job['id']}/events")  # joins mid-run
    results = [data["index"] for kind, data in events if kind == "result"]
    assert sorted(results) == list(range(40))
    assert "progress" in {kind for kind, _ in events}
    assert events[-1][1]["ok"] == 40


BAD_INPUT = [
    ("malformed JSON", b'{"count": 3', 400, "malformed JSON body"),
    ("a JSON array", b"[1, 2]", 400, "must be a JSON object"),
    ("unknown key", b'{"colour": "red"}', 400, "unknown config key 'colour'"),
    ("wrong type", b'{"count": "many"}', 400, "count (from the job) must be an integer"),
    ("count 0", b'{"count": 0}', 400, "count must be at least 1"),
    ("unknown backend", b'{"backend": "gpu"}', 400, "backend must be one of"),
    ("out given", b'{"out": "/etc"}', 400, "out is set by the service"),
    ("resume given", b'{"resume": true}', 400, "resume is set by the service"),
    ("server.port", b'{"server": {"port": 80}}', 400, "server.port is set by the service"),
    ("service key", b'{"service": {"token": "x"}}', 400, "service.token is set by the service"),
    ("dask key", b'{"dask": {"scheduler": "tcp://x:1"}}', 400, "dask.scheduler is set"),
    ("urls a string", b'{"urls": "/etc/passwd"}', 400, "urls must be a JSON array"),
    ("urls not strings", b'{"urls": [1]}', 400, "urls[0] must be a string"),
    ("count over cap", b'{"count": 100001}', 400, "over this service's cap of 100000"),
    ("concurrency over cap", b'{"http": {"concurrency": 999}}', 400, "service.max_concurrency"),
    ("bad template", b'{"url": "ftp://x/{i}"}', 400, "http"),
    ("NaN", b'{"http": {"rate": NaN}}', 400, "malformed JSON body"),
    ("a 2 MiB body", b'{"urls": ["' + b"a" * (2 * 2**20) + b'"]}', 413, "1 MiB"),
    ("nested too deeply", b"[" * 200_000 + b"]" * 200_000, 400, "nested too deeply"),
]
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({"Content-Type": "text/plain"}, 415, "Content-Type: application/json"),
        ({**JSON_TYPE, "Origin": "http://evil.example"}, 403, "http://evil.example"),
        ({**JSON_TYPE, "Host": "evil.example"}, 403, "evil.example"),
    ],
    ids=["text/plain body", "foreign Origin", "foreign Host (DNS rebinding)"],
)
async def test_without_a_token_only_the_services_own_pages_get_in(
    client: TestClient[Any, Any], headers: dict[str, str], status: int, message: str
) -> None:
    """A page of another site can send a text/plain POST without asking; a page served
    from a rebound DNS name reaches the service under a Host that is not its own."""
    body = json.dumps({**SMALL, "count": 1}).encode()
    response = await client.post("/api/v1/jobs", data=body, headers=headers)
    assert response.status == status
    assert message in (await response.json())["error"]
    assert (await (await client.get("/api/v1/jobs")).json()) == {"jobs": []}
    same_origin = {**JSON_TYPE, "Origin": f"http://{client.host}:{client.port}"}
    assert (await client.post("/api/v1/jobs", data=body, headers=same_origin)).status == 201


@pytest.mark.parametrize(("body", "status", "message"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])  # fmt: skip
async def test_bad_input_is_one_line_and_the_service_stays_up(
    client: TestClient[Any, Any], body: bytes, status: int, message: str
) -> None:
    response = await client.post("/api/v1/jobs", data=io.BytesIO(body), headers=JSON_TYPE)
    assert response.status == status
    error = (await response.json())["error"]
    assert message in error and "\n" not in error
    assert (await (await client.get("/api/v1/jobs")).json()) == {"jobs": []}
    assert (await client.get("/api/v1/health")).status == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/jobs/nosuchjob", 404),
        ("GET", "/api/v1/jobs/bad%20id!", 404),
        ("DELETE", "/api/v1/jobs/nosuchjob", 404),
        ("POST", "/api/v1/jobs/nosuchjob/retry", 404),
        ("GET", "/api/v1/jobs/nosuchjob/events", 404),
        ("GET", "/api/v1/nothing", 404),
        ("PUT", "/api/v1/jobs", 405),
        ("GET", "/api/v1/jobs?limit=0", 400),
        ("GET", "/api/v1/jobs?state=lost", 400),
    ],
)
async def test_unknown_things_are_json_errors(
    client: TestClient[Any, Any], method: str, path: str, status: int
) -> None:
    response = await client.request(method, path)
    assert response.status == status
    assert "\n" not in (await response.json())["error"]


async def test_files_are_only_what_the_manifest_lists(client: TestClient[Any, Any]) -> None:
    first, second = await submit(client, count=2), await submit(client, count=2)
    await finished(client, first["id"])
    await finished(client, second["id"])
    listed = json.loads((await (await client.get(f"/api/v1/jobs/{first['id']}/manifest")).text())
                        .splitlines()[0])  # fmt: skip
    a, b, name = first["id"], second["id"], listed["path"]
    assert (await client.get(f"/files/{a}/{name}")).status == 200
    for path in [
        f"/files/{a}/manifest.jsonl",
        f"/files/{a}/../{b}/{name}",
        f"/files/{a}/%2e%2e/{b}/{name}",
        f"/files/{a}/..%2f{b}%2f{name}",
        f"/files/{a}/%2e%2e%2f%2e%2e%2fjobs.sqlite",
        f"/files/{a}//etc/passwd",
        f"/files/{a}/%2fetc%2fpasswd",
        f"/files/{a}/thumbnails",
        f"/files/{a}/thumbnails/../{name}",
        f"/files/{a}/.downloader.lock",
        f"/files/..%2f{a}/{name}",
        f"/files/nosuchjob/{name}",
    ]:
        assert await raw_status(client, path) == 404, path


async def raw_status(client: TestClient[Any, Any], path: str) -> int:
    """GET ``path`` exactly as written (a client library would normalise ``..``)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    host = f"{client.host}:{client.port}"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    writer.close()
    await writer.wait_closed()
    return status


async def test_cancel_and_retry_follow_the_state_rules(client: TestClient[Any, Any]) -> None:
    slow = await submit(client, count=40, server={"latency_ms": 100}, http={"concurrency": 2})
    assert (await client.post(f"/api/v1/jobs/{slow['id']}/retry")).status == 409

    async def running() -> bool:
        job = await (await client.get(f"/api/v1/jobs/{slow['id']}")).json()
        return bool(job["ok"] >= 2)

    await until(running, "the job to fetch")
    assert (await client.delete(f"/api/v1/jobs/{slow['id']}")).status == 202
    # A second cancel (a double click) must not stop the job's process a second, hard way.
    assert (await client.delete(f"/api/v1/jobs/{slow['id']}")).status == 202
    cancelled = await finished(client, slow["id"])
    assert cancelled["state"] == "cancelled" and 2 <= cancelled["ok"] < 40
    assert cancelled["summary"] is not None  # the run stopped in order and summed up
    assert (await client.delete(f"/api/v1/jobs/{slow['id']}")).status == 409
    assert client.server.app is not None
    out = client.server.app[SETTINGS].service.data / "jobs" / slow["id"]
    assert_every_file_has_its_line(out)
    kept = {p.name: p.stat().st_ino for p in out.glob("*.jpg")}
    assert (await client.post(f"/api/v1/jobs/{slow['id']}/retry")).status == 202
    again = await finished(client, slow["id"])
    assert (again["state"], again["ok"], again["failed"]) == ("done", 40, 0)
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # none fetched again
    assert_every_file_has_its_line(out)


async def test_a_job_whose_process_dies_fails_with_the_reason(
    client: TestClient[Any, Any],
) -> None:
    job = await submit(client, count=40, server={"latency_ms": 100}, http={"concurrency": 2})
    assert client.server.app is not None
    store = client.server.app[STORE]

    async def pid() -> int | None:
        row = store.get(job["id"])
        return row.pid if row is not None and row.state == "running" else None

    os.kill(await until(pid, "the job's process"), signal.SIGKILL)
    ended = await finished(client, job["id"])
    assert ended["state"] == "failed"
    assert ended["error"] == "the job's process was killed by SIGKILL"
    assert (await (await client.get("/api/v1/health")).json())["status"] == "ok"


def assert_every_file_has_its_line(out: Path) -> None:
    lines = records(out)
    listed = {r["path"] for r in lines if r["path"]} | {
        r["thumbnail"] for r in lines if r["thumbnail"]
    }
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    on_disk -= {"manifest.jsonl"}
    on_disk = {p for p in on_disk if not Path(p).name.startswith(".")}
    assert on_disk == listed
    assert not [p for p in out.rglob("*.part")]


async def test_token_guards_api_and_files_not_health_or_login(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", token=TOKEN)
    try:
        assert (await client.get("/api/v1/health")).status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await client.get("/api/v1/jobs", headers=headers)
            assert response.status == 401
            assert "token" in (await response.json())["error"]
            assert (await client.get("/files/abc/x.jpg", headers=headers)).status == 401
            assert (await client.get("/api/v1/events", headers=headers)).status == 401
        ok = await client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200
        assert "Access-Control-Allow-Origin" not in ok.headers
        assert (await client.post("/api/v1/login", json={"token": "wrong"})).status == 401
        login = await client.post("/api/v1/login", json={"token": TOKEN})
        assert login.status == 204
        cookie = login.cookies["downloader_token"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert (await client.get("/api/v1/jobs")).status == 200  # the cookie jar has it now
    finally:
        await client.close()


async def test_shutdown_ends_open_streams(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data")
    response = await client.get("/api/v1/events")
    assert response.status == 200
    job = await submit(client, count=1)
    line = await asyncio.wait_for(response.content.readline(), 30)
    assert line == b"event: job\n"
    assert job["id"] in (await response.content.readline()).decode()
    closing = asyncio.create_task(client.server.close())
    # The service ends the stream as it stops (aiohttp would otherwise wait 60 s for it).
    await asyncio.wait_for(response.content.read(), 30)
    await asyncio.wait_for(closing, 30)
    await client.close()


@pytest.mark.parametrize("allow_private", [False, True])
async def test_jobs_cannot_reach_private_addresses_unless_allowed(
    tmp_path: Path, image_server: Any, allow_private: bool
) -> None:
    client = await service_client(tmp_path / "data", allow_private=allow_private)
    try:
        url = f"{image_server.base}/64/48?lock=3"  # the test server, on 127.0.0.1
        response = await client.post(
            "/api/v1/jobs", json={"urls": [url], "thumbnails": {"size": 0}}
        )
        job = await finished(client, (await response.json())["id"])
        assert job["state"] == "done"
        manifest = await (await client.get(f"/api/v1/jobs/{job['id']}/manifest")).text()
        record = json.loads(manifest)
        if allow_private:
            assert (job["ok"], record["status"]) == (1, "ok")
        else:
            assert (job["failed"], record["status"]) == (1, "failed")
            assert "http.block_private" in record["error"]
    finally:
        await client.close()


async def test_the_page_is_served_without_a_token(tmp_path: Path) -> None:
    client = await service_client(tmp_path / "data", token=TOKEN)
    try:
        page = await client.get("/")
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        script = await client.get("/web/app.js")
        assert script.headers["Content-Type"].startswith("text/javascript")
        style = await client.get("/web/style.css")
        assert style.headers["Content-Type"].startswith("text/css")
        for path in ["/web/nope.js", "/web/..%2f__init__.py", "/web/.hidden", "/web/"]:
            assert await raw_status(client, path) == 404, path
    finally:
        await client.close()


async def test_a_job_whose_folder_is_in_use_waits_for_it(tmp_path: Path) -> None:
    from downloader.lock import OutputLock

    client = await service_client(tmp_path / "data", max_jobs=1)
    try:
        first = await submit(client, count=40, server={"latency_ms": 100}, http={"concurrency": 2})
        second = await submit(client, count=2)
        assert client.server.app is not None
        store = client.server.app[STORE]
        lock = OutputLock(client.server.app[SETTINGS].service.data / "jobs" / second["id"])
        lock.acquire()  # as a process of an earlier service that is still stopping would
        try:
            assert (await client.delete(f"/api/v1/jobs/{first['id']}")).status == 202

            async def refused_twice() -> bool:
                states = [t.state for t in store.history(second["id"])]
                return states.count("running") >= 2

            await until(refused_twice, "the job to be started again")
        finally:
            lock.release()
        job = await finished(client, second["id"])
        assert (job["state"], job["ok"]) == ("done", 2)
    finally:
        await client.close()


async def test_a_unique_job_continues_after_a_cancel(client: TestClient[Any, Any]) -> None:
    slow = {"latency_ms": 150, "pool_size": 40}
    job = await submit(client, count=20, unique=True, server=slow, http={"concurrency": 2})

    async def some() -> bool:
        state = await (await client.get(f"/api/v1/jobs/{job['id']}")).json()
        return bool(state["ok"] >= 3)

    await until(some, "a few distinct images")
    assert (await client.delete(f"/api/v1/jobs/{job['id']}")).status == 202
    assert (await finished(client, job["id"]))["state"] == "cancelled"
    assert (await client.post(f"/api/v1/jobs/{job['id']}/retry")).status == 202
    done = await finished(client, job["id"])
    assert (done["state"], done["ok"], done["total"]) == ("done", 20, 20)
    lines = (await (await client.get(f"/api/v1/jobs/{job['id']}/manifest")).text()).splitlines()
    hashes = [r["sha256"] for r in map(json.loads, lines) if r["status"] == "ok"]
    assert len(hashes) == len(set(hashes)) == 20


async def test_idle_streams_get_heartbeats(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from downloader.service import streams

    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.05)
    async with client.get("/api/v1/events") as response:
        assert response.headers["Cache-Control"] == "no-cache"
        assert await asyncio.wait_for(response.content.readline(), 30) == b": ping\n"


def _manifest_line(index: int, status: str) -> str:
    record: dict[str, Any] = {"index": index, "url": f"http://h/{index}", "status": status}
    if status == "ok":
        record["path"] = f"{index:06d}.jpg"
    else:
        record["error"] = "HTTP 503 from http://h/"
    return json.dumps(record)


async def test_an_event_id_from_a_feed_built_again_replays_every_result(tmp_path: Path) -> None:
    """A retried job's manifest loses its superseded lines: a feed built again (a service
    restart) numbers the results differently, so a client's old Last-Event-ID must not
    skip by position there; within one feed it skips exactly what was seen."""
    from downloader.service.feed import Feed

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(_manifest_line(i, "failed") + "\n" for i in range(6)))
    first = Feed(tmp_path)
    assert await first.poll() == 6
    # The retry: a fresh file (another inode) with a new line for every index.
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(_manifest_line(i, "ok") + "\n" for i in range(6)))
    fresh.replace(manifest)
    assert await first.poll() == 6
    seen = first.replay()[:8]  # a client saw the 6 failures and 2 of the new lines
    assert [json.loads(e.data)["status"] for e in seen] == ["failed"] * 6 + ["ok"] * 2
    rest = first.replay(seen[-1].id or "")
    assert [json.loads(e.data)["index"] for e in rest] == [2, 3, 4, 5]  # same feed: the rest

    again = Feed(tmp_path)  # the service restarted: the manifest holds the 6 ok lines
    assert await again.poll() == 6
    replayed = again.replay(seen[-1].id or "")
    assert [json.loads(e.data)["index"] for e in replayed] == list(range(6))
    assert all(json.loads(e.data)["status"] == "ok" for e in replayed)
    assert again.replay("8") == again.replay()  # a bare number vouches for nothing


async def test_a_stream_resumed_with_last_event_id_skips_what_was_seen(
    client: TestClient[Any, Any],
) -> None:
    job = await submit(client, count=5)
    await finished(client, job["id"])
    path = f"/api/v1/jobs/{job['id']}/events"

    async def stream(last: str | None) -> list[tuple[str | None, str, Any]]:
        headers = {"Last-Event-ID": last} if last is not None else {}
        events = await read_stream(client, path, headers)
        return [(event.id, event.event, json.loads(event.data)) for event in events]

    everything = await stream(None)
    results = [(i, data["index"]) for i, kind, data in everything if kind == "result"]
    assert len(results) == 5 and all(i for i, _ in results)
    after = await stream(results[1][0])
    assert [data["index"] for _, kind, data in after if kind == "result"] == [
        index for _, index in results[2:]
    ]
    assert after[-1][1] == "end"
    unknown = await stream("not-an-id-of-this-feed")
    assert sorted(d["index"] for _, kind, d in unknown if kind == "result") == list(range(5))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True), ("LocalHost", True), ("127.0.0.1", True), ("127.8.0.1", True),
        ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False),
        ("192.168.1.2", False), ("::", False), ("localhost.example.com", False), ("", False),
    ],
)  # fmt: skip
def test_one_definition_of_loopback(host: str, loopback: bool) -> None:
    """What may run without a token, and the Host names a tokenless service answers."""
    from downloader.netguard import is_loopback

    assert is_loopback(host) is loopback


async def test_a_jobs_timeline_has_every_images_spans(client: TestClient[Any, Any]) -> None:
    job = await submit(client, count=4)
    path = f"/api/v1/jobs/{job['id']}/timeline"
    await finished(client, job["id"])
    body = await (await client.get(path)).json()
    assert body["state"] == "done" and len(body["spans"]) == 12
    phases: dict[int, list[str]] = {}
    for span in body["spans"]:
        phases.setdefault(span["index"], []).append(span["phase"])
        assert span["process"] > 0 and span["thread"] > 0 and span["start"] <= span["end"]
    assert phases == {i: ["wait", "cpu", "write"] for i in range(4)}
    page = await (await client.get(f"{path}?limit=10")).json()
    assert page["spans"] == body["spans"][:10]
    rest = await (await client.get(f"{path}?after={page['next']}")).json()
    assert rest["spans"] == body["spans"][10:] and rest["next"] == body["next"]
    none = await (await client.get(f"{path}?after={body['next']}")).json()
    assert none["spans"] == [] and none["next"] == body["next"]
    for query, name in (("?after=x", "after"), ("?after=-1", "after"), ("?limit=0", "limit")):
        response = await client.get(path + query)
        assert response.status == 400 and name in (await response.json())["error"]
    assert (await client.get("/api/v1/jobs/nope/timeline")).status == 404
