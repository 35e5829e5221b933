"""``download submit``: post a job to a running service; with ``--wait``, follow it.

The body is built from the usual download flags (and ``--config``, ``--urls`` read here);
the service validates it. ``--wait`` feeds the CLI's progress bar from the job's event
stream and exits with the job's code (``outcome.ExitCode``): OK all ok, FAILED some
failed, USAGE refused or could not run, INTERRUPTED cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import requests
from sseclient import SSEClient

from ..backends import BACKENDS
from ..config import read_toml
from ..errors import ConfigError
from ..outcome import ExitCode
from ..result import Result
from ..settings import Settings

EXIT_BY_STATE = {"failed": ExitCode.USAGE, "cancelled": ExitCode.INTERRUPTED}
NOT_FOR_JOBS = {"out": "--out", "resume": "--resume", "retry_failed": "--retry-failed"}
RECONNECTS = 5


def job_body(overrides: dict[str, Any], config: Path | None, urls: str | None) -> dict[str, Any]:
    """Flags (dotted keys, None = not given) over the config file -> the job's JSON body."""
    body: dict[str, Any] = read_toml(config) if config is not None else {}
    for key, value in overrides.items():
        if value is None or key in ("progress", "urls"):
            continue
        if key in NOT_FOR_JOBS:
            raise ConfigError(f"{NOT_FOR_JOBS[key]} is the service's to choose, not a job's")
        section, _, name = key.rpartition(".")
        target = body.setdefault(section, {}) if section else body
        target[name] = str(value) if isinstance(value, Path) else value
    if urls:
        from ..jobs import UrlList

        body["urls"] = [job.url for job in UrlList(urls).jobs()]
    return body


class Service:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.session.post(f"{self.url}/api/v1/jobs", json=body, timeout=60)
        except requests.RequestException as exc:
            raise ConfigError(f"cannot reach the service at {self.url}: {exc}") from None
        if response.status_code != 201:
            raise ConfigError(f"the service refused the job: {_error(response)}")
        job: dict[str, Any] = response.json()
        return job

    def jobs(self, state: str | None) -> list[dict[str, Any]]:
        """The service's jobs, newest first."""
        params = {"limit": "1000", **({"state": state} if state else {})}
        response = self._call("GET", "/api/v1/jobs", params=params)
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    def act(self, job_id: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume``, ``retry`` or ``cancel`` a job; the job as it now is."""
        if action == "cancel":
            response = self._call("DELETE", f"/api/v1/jobs/{quote(job_id, safe='')}")
        else:
            response = self._call("POST", f"/api/v1/jobs/{quote(job_id, safe='')}/{action}")
        job: dict[str, Any] = response.json()
        return job

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, timeout=60, **kwargs)
        except requests.RequestException as exc:
            raise ConfigError(f"cannot reach the service at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise ConfigError(f"the service refused: {_error(response)}")
        try:
            response.json()
        except ValueError:
            raise ConfigError(f"{self.url} does not answer as a job service does") from None
        return response

    def events(self, job_id: str) -> Iterator[tuple[str, str]]:
        """(event, data) of the job's stream until ``end``; reconnects where it left off."""
        last_id, failures = "", 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.session.get(
                    f"{self.url}/api/v1/jobs/{job_id}/events",
                    headers=headers, stream=True, timeout=(30, 60),
                ) as response:  # fmt: skip
                    if response.status_code != 200:
                        raise ConfigError(f"cannot follow job {job_id}: {_error(response)}")
                    # chunk_size=None: each chunk as it arrives, so no event waits for more.
                    stream = SSEClient(response.iter_content(chunk_size=None))
                    for event in stream.events():
                        last_id = event.id or last_id
                        failures = 0
                        yield event.event, event.data
                        if event.event == "end":
                            return
            except requests.RequestException as exc:
                failures += 1
                if failures > RECONNECTS:
                    raise ConfigError(f"lost the service at {self.url}: {exc}") from None


def job_line(job: dict[str, Any]) -> str:
    """One job as ``download jobs`` lists it."""
    total = job.get("total")
    counts = f"{job.get('ok', 0)} ok, {job.get('failed', 0)} failed of {total or '?'}"
    return (
        f"{job['id']}  {job['state']:<9}  {counts}  priority {job.get('priority', 0)}  "
        f"{job.get('created_at', '')}"
    )


def _error(response: requests.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def wait(service: Service, job: dict[str, Any], quiet: bool, verbose: int) -> int:
    """Follow the job with the CLI's progress bar; the job's exit code."""
    from ..progress import ProgressReporter

    backend = job["spec"].get("backend", "asyncio")
    settings = Settings(backend=backend if backend in BACKENDS else "asyncio", progress=not quiet)
    end = job
    with ProgressReporter(settings, verbose) as reporter:
        reporter.start(job.get("total"), 0)
        for kind, data in service.events(job["id"]):
            if kind == "result":
                reporter.result(Result.from_record(json.loads(data)))
            elif kind == "end":
                end = json.loads(data)
    click.echo(end.get("summary") or f"job {end['id']} {end['state']}")
    if end["state"] in EXIT_BY_STATE:
        if end.get("error"):
            click.echo(f"error: {end['error']}", err=True)
        return EXIT_BY_STATE[end["state"]]
    return ExitCode.OK if end.get("failed", 0) == 0 else ExitCode.FAILED
