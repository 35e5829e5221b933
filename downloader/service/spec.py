"""A job's spec: the JSON body, checked by the CLI's settings code plus the service's rules.

The body has the config file's keys and nesting, plus ``urls`` (a JSON array). The job's
settings are the service's own (its config file and environment, except ``service.*``)
with the body layered over them; the service sets where the files go. What the child
process runs is that resolved, flat set of values, saved once at submit, so a job resumed
after a restart runs exactly as it was accepted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import build, coerce, flatten
from ..errors import ConfigError
from ..settings import Settings, known_keys
from ..stores import check_url, is_url

# Keys a client may not set: where files go, how a run restarts, and the service's own.
# (``out`` may be a URL under one of ``service.out_urls``: see ``_out_url``.)
SERVICE_KEYS = frozenset(
    {"out", "state", "store", "resume", "retry_failed", "progress", "server.host", "server.port"}
)
SERVICE_SECTIONS = ("dask.", "service.")
# Refuses loopback/private/link-local addresses, checked on the address connected to.
BLOCK_PRIVATE = "http.block_private"
ORIGIN = "the job"
MAX_PRIORITY = 1_000_000  # SQLite's integers are 64-bit; JSON's past 2**53 are not exact


@dataclass(frozen=True)
class JobSpec:
    """What a job runs: flat settings values (JSON-able, no ``out``) and its URL list."""

    values: dict[str, Any]
    urls: list[str] | None
    total: int | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        return cls(values=data["values"], urls=data["urls"], total=data["total"])


@dataclass(frozen=True)
class JobEnd:
    """A job's process's last word: one JSON line on its stdout, read by the runner."""

    summary: str
    images_per_s: float
    note: str | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobEnd | None:
        """The end a line names, or None for any other line."""
        try:
            data = json.loads(text)
            return cls(str(data["summary"]), float(data["images_per_s"]), data["note"])
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class JobExtras:
    """What a job's body says besides its settings: how it is scheduled and announced."""

    priority: int = 0
    webhook: Any = None  # checked by ``webhooks.check_url`` (it resolves the name)


def split_extras(body: Any) -> tuple[Any, JobExtras]:
    """The body less ``priority`` and ``webhook``, and those two (``priority`` checked)."""
    if not isinstance(body, dict):
        return body, JobExtras()
    body = dict(body)
    priority = body.pop("priority", 0)
    webhook = body.pop("webhook", None)
    return body, JobExtras(check_priority(priority), webhook)


def check_priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise ConfigError(
            f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}, got {value!r}"
        )
    return value


def service_values(service: Settings) -> dict[str, Any]:
    """The service's settings as flat values, the base a job's body is layered over."""
    values: dict[str, Any] = {}
    for key in known_keys():
        section, _, name = key.rpartition(".")
        if section == "service":
            continue  # the token must not reach a job
        value = getattr(getattr(service, section) if section else service, name)
        values[key] = str(value) if isinstance(value, Path) else value
    return values


def parse_body(body: Any, service: Settings) -> JobSpec:
    """A job's body -> ``JobSpec``; a ``ConfigError`` with one line for anything wrong."""
    if not isinstance(body, dict):
        raise ConfigError("the body must be a JSON object of settings")
    body = dict(body)
    urls = _urls(body.pop("urls", None))
    flat = flatten(body, ORIGIN)
    out_url = _out_url(flat.pop("out", None), service)
    for key in flat:
        if key in SERVICE_KEYS or key == BLOCK_PRIVATE or key.startswith(SERVICE_SECTIONS):
            raise ConfigError(f"{key} is set by the service, not by a job")
    values = service_values(service)
    for key, value in flat.items():
        values[key] = coerce(key, value, ORIGIN)
    if out_url is not None:
        values["out"] = out_url  # the job's folder keeps its manifest (``job_settings``)
        if "thumbnails.size" not in flat:
            values["thumbnails.size"] = 0  # thumbnails are files: a URL OUT has none
    values.update(progress=False, resume=False, retry_failed=False)
    if urls is not None:
        values["urls"] = "urls.txt"  # placeholder: the child gets the real file
    settings = job_settings(values, Path("."), None)
    _check_caps(settings, service, urls)
    if urls is None:
        from ..jobs import source_for

        source_for(settings)  # a bad URL template is the CLI's one-line error
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    total = len(urls) if urls is not None else settings.count
    return JobSpec(values=values, urls=urls, total=total)


def job_settings(values: dict[str, Any], out: Path, urls_file: Path | None) -> Settings:
    """The Settings a job runs with, from its saved values (the child process's door)."""
    coerced = {key: coerce(key, value, ORIGIN) for key, value in values.items()}
    if is_url(coerced.get("out")):
        coerced["state"] = str(out)  # the shards go to the URL, the manifest stays here
    else:
        coerced["out"] = out
    if urls_file is not None:
        coerced["urls"] = str(urls_file)
    return build(coerced)


def with_block_private(values: dict[str, Any], service: Settings) -> dict[str, Any]:
    """The values with the private-address guard on, unless the service allows private
    addresses or the job fetches from its own built-in server."""
    if service.service.allow_private or values.get("local"):
        return values
    return {**values, BLOCK_PRIVATE: True}


def _out_url(value: Any, service: Settings) -> str | None:
    """A job's own ``out``: a URL under one of the service's ``service.out_urls``
    prefixes, or refused (without them, the service chooses where every job's files go)."""
    if value is None:
        return None
    allowed = [prefix.rstrip("/") for prefix in service.service.out_urls.split(",") if prefix]
    if not allowed or not is_url(value):
        under = f" (a URL under {', '.join(allowed)} may be)" if allowed else ""
        raise ConfigError(f"out is set by the service, not by a job{under}")
    url = check_url(value)
    if not any(url.startswith(f"{prefix}/") for prefix in allowed):
        raise ConfigError(
            f"out {url} is not under a URL this service allows: {', '.join(allowed)} "
            "(service.out_urls)"
        )
    return url


def _urls(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ConfigError("urls must be a JSON array of URL strings")
    if not value:
        raise ConfigError("urls must hold at least one URL")
    for position, url in enumerate(value):
        if not isinstance(url, str):
            raise ConfigError(f"urls[{position}] must be a string, got {url!r}")
        if "\n" in url or "\r" in url or not url.strip():
            raise ConfigError(f"urls[{position}] must be one URL on one line")
    return list(value)


def _check_caps(settings: Settings, service: Settings, urls: list[str] | None) -> None:
    caps = service.service
    wanted = len(urls) if urls is not None else settings.count
    if wanted > caps.max_count:
        what = "urls holds" if urls is not None else "count is"
        raise ConfigError(
            f"{what} {wanted} images, over this service's cap of {caps.max_count} "
            "(service.max_count)"
        )
    for key, value in (
        ("http.concurrency", settings.http.concurrency),
        ("http.per_host", settings.http.per_host),
        ("workers", settings.workers),
    ):
        if value > caps.max_concurrency:
            raise ConfigError(
                f"{key} {value} is over this service's cap of {caps.max_concurrency} "
                "(service.max_concurrency)"
            )
    if settings.http.max_bytes > service.http.max_bytes:
        raise ConfigError(
            f"http.max_bytes {settings.http.max_bytes} is over this service's "
            f"{service.http.max_bytes}"
        )
