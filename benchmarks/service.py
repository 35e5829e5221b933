"""The job service against the CLI, and the API's latency while a job runs.

1. The same ``--local`` job (default 2000 images) as a CLI process and through the
   service (POST to the job's ``end`` event, as a client sees it), interleaved
   ``--repeat`` times, which goes first alternating; medians and their ratio (target:
   service <= 1.10 x CLI). Both walls include process start-up; the service's is from
   the POST to the job's ``end`` event, so it includes the queue and the event stream.
2. ``--clients`` (50) clients each polling ``GET /api/v1/jobs/{id}`` every
   ``--interval`` seconds while a job runs; p50/p95/p99 latency (target: p95 < 50 ms).

Not a test and not run by CI. Both parts run in one invocation, on one machine: the
numbers are comparable with each other, not with another machine's.

    python benchmarks/service.py                      # -n 2000 --repeat 5 --clients 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp


def _command() -> list[str]:
    script = Path(sys.executable).parent / "download"
    repo = Path(__file__).resolve().parent.parent
    return [str(script)] if script.exists() else [sys.executable, str(repo / "cli.py")]


def _env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DOWNLOADER_") and not k.lower().endswith("_proxy")
    }


@contextlib.contextmanager
def service(data: Path, max_jobs: int) -> Iterator[str]:
    log = data.parent / "service.log"
    command = [*_command(), "service", "--port", "0", "--data", str(data),
               "--max-jobs", str(max_jobs)]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving on (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(60)


def cli_run(out: Path, job: dict[str, Any]) -> float:
    command = [*_command(), "-n", str(job["count"]), "--local", "--out", str(out), "-q",
               "--concurrency", str(job["http"]["concurrency"])]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env=_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def service_run(url: str, job: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds from POST to the job's ``end`` event, and the job at its end."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        started = time.perf_counter()
        async with session.post(f"{url}/api/v1/jobs", json=job) as response:
            created = await response.json()
        end: dict[str, Any] = {}
        async with session.get(f"{url}/api/v1/jobs/{created['id']}/events") as stream:
            kind = ""
            async for raw in stream.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif kind == "end" and line.startswith("data: "):
                    end = json.loads(line[6:])
                    break
        return time.perf_counter() - started, end


async def poll_latency(url: str, job: dict[str, Any], clients: int, interval: float) -> list[float]:
    """Latencies (ms) of GET /api/v1/jobs/{id} from ``clients`` pollers while the job runs."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"{url}/api/v1/jobs", json=job) as response:
            job_id = (await response.json())["id"]
        latencies: list[float] = []
        state = {"running": False, "done": False}

        async def client(offset: float) -> None:
            await asyncio.sleep(offset)
            while not state["done"]:
                started = time.perf_counter()
                async with session.get(f"{url}/api/v1/jobs/{job_id}") as answer:
                    body = await answer.json()
                elapsed = (time.perf_counter() - started) * 1000
                if body["state"] == "running":
                    state["running"] = True
                    latencies.append(elapsed)
                elif state["running"] or body["state"] in ("done", "failed", "cancelled"):
                    state["done"] = True
                await asyncio.sleep(interval)

        await asyncio.gather(*(client(i * interval / clients) for i in range(clients)))
        return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between polls")
    parser.add_argument("--poll-latency-ms", type=float, default=20.0,
                        help="server latency of the job polled (so it runs a while)")  # fmt: skip
    args = parser.parse_args()
    job = {"count": args.count, "local": True, "http": {"concurrency": args.concurrency}}
    root = Path(tempfile.mkdtemp(prefix="service-bench-"))
    try:
        cli_s, service_s = [], []
        with service(root / "data", max_jobs=1) as url:
            for repeat in range(args.repeat):
                for which in ("cli", "service") if repeat % 2 == 0 else ("service", "cli"):
                    if which == "cli":
                        out = root / f"cli-{repeat}"
                        cli_s.append(cli_run(out, job))
                        shutil.rmtree(out)
                        continue
                    seconds, end = asyncio.run(service_run(url, job))
                    assert end.get("state") == "done" and end["ok"] == args.count, end
                    service_s.append(seconds)
                    shutil.rmtree(root / "data" / "jobs" / end["id"])
            slow = {**job, "server": {"latency_ms": args.poll_latency_ms}}
            latencies = asyncio.run(poll_latency(url, slow, args.clients, args.interval))
        cli, svc = statistics.median(cli_s), statistics.median(service_s)
        print(f"{args.count} images, --local, concurrency {args.concurrency}, "
              f"median of {args.repeat} (interleaved, order alternating):")  # fmt: skip
        print(f"  CLI      {cli:6.2f} s   runs: {', '.join(f'{s:.2f}' for s in cli_s)}")
        print(f"  service  {svc:6.2f} s   runs: {', '.join(f'{s:.2f}' for s in service_s)}")
        print(f"  service / CLI wall: {svc / cli:.2f}x (target <= 1.10x)")
        print(f"GET /api/v1/jobs/{{id}}, {args.clients} clients every {args.interval:g} s "
              f"while a job runs: {len(latencies)} requests")  # fmt: skip
        print(f"  p50 {percentile(latencies, 50):.1f} ms, p95 {percentile(latencies, 95):.1f} ms, "
              f"p99 {percentile(latencies, 99):.1f} ms (target p95 < 50 ms)")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
