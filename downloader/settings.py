"""Settings: frozen dataclasses, layered defaults <- config file <- DOWNLOADER_* env <- flags.

Every key has a dotted name (``count``, ``http.timeout``, ``thumbnails.size``) used the
same way in the TOML file (``[http] timeout = 30``), in the environment
(``DOWNLOADER_HTTP_TIMEOUT=30``) and by the CLI. Unknown keys and wrong types are a
``ConfigError`` with a one-line message, never a silent default.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_URL = "https://loremflickr.com/{width}/{height}/{keywords}?lock={i}"
BACKENDS = ("sync", "threads", "asyncio", "processes", "hybrid", "dask")
THUMBNAIL_EXECUTORS = ("process", "thread", "inline")


@dataclass(frozen=True)
class HttpSettings:
    concurrency: int = 32
    per_host: int = 0  # 0 = same as concurrency
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 10
    rate: float = 0.0  # requests per second per host; 0 = no limit
    user_agent: str = "downloader/0.1 (+https://github.com/)"

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, "http.concurrency must be at least 1")
        _check(self.per_host >= 0, "http.per_host must be 0 (no cap) or more")
        _check(0 < self.timeout <= 86400, "http.timeout must be a number of seconds, at most 86400")
        _check(self.retries >= 0, "http.retries must be 0 or more")
        _check(0 <= self.backoff <= 3600, "http.backoff must be 0 to 3600 seconds")
        _check(0 <= self.max_backoff <= 3600, "http.max_backoff must be 0 to 3600 seconds")
        _check(self.max_bytes >= 1, "http.max_bytes must be at least 1")
        _check(self.max_redirects >= 0, "http.max_redirects must be 0 or more")
        _check(
            self.rate == 0 or 0.001 <= self.rate <= 1e6,
            "http.rate must be 0 (no limit) or 0.001 to 1000000 requests per second",
        )


@dataclass(frozen=True)
class ThumbnailSettings:
    size: int = 128  # longest side in pixels; 0 = no thumbnails
    executor: str = "process"
    quality: int = 85

    def __post_init__(self) -> None:
        _check(self.size >= 0, "thumbnails.size must be 0 (off) or a positive pixel count")
        _check(
            self.executor in THUMBNAIL_EXECUTORS,
            f"thumbnails.executor must be one of {', '.join(THUMBNAIL_EXECUTORS)}",
        )
        _check(1 <= self.quality <= 95, "thumbnails.quality must be between 1 and 95")


@dataclass(frozen=True)
class ServerSettings:
    """Knobs of the built-in loremflickr-compatible server (``serve`` and ``--local``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    seed: int = 0
    pool_size: int = 40
    # Fault injection: the share of entry URLs (first request only, except corrupt) that fail.
    fail_rate: float = 0.0  # 503 with Retry-After
    throttle_rate: float = 0.0  # 429 with Retry-After
    reset_rate: float = 0.0  # part of the body, then the connection drops
    truncate_rate: float = 0.0  # Content-Length over the body, then the connection closes
    stall_rate: float = 0.0  # nothing at all for stall_s seconds
    slow_rate: float = 0.0  # the body trickles over about slow_ms milliseconds
    corrupt_rate: float = 0.0  # JPEG magic bytes then garbage, on every request
    retry_after: int = 1
    stall_s: float = 3600.0
    slow_ms: float = 1000.0

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "server.port must be between 0 and 65535")
        _check(self.latency_ms >= 0, "server.latency_ms must be 0 or more")
        _check(self.jitter_ms >= 0, "server.jitter_ms must be 0 or more")
        _check(self.pool_size >= 1, "server.pool_size must be at least 1")
        rates = {
            "fail_rate": self.fail_rate,
            "throttle_rate": self.throttle_rate,
            "reset_rate": self.reset_rate,
            "truncate_rate": self.truncate_rate,
            "stall_rate": self.stall_rate,
            "slow_rate": self.slow_rate,
            "corrupt_rate": self.corrupt_rate,
        }
        for name, rate in rates.items():
            _check(0 <= rate <= 1, f"server.{name} must be between 0 and 1")
        _check(
            sum(rates.values()) <= 1 + 1e-9,
            f"server fault rates ({' + '.join(rates)}) must add up to at most 1",
        )
        _check(self.retry_after >= 0, "server.retry_after must be 0 or more seconds")
        _check(self.stall_s >= 0, "server.stall_s must be 0 or more seconds")
        _check(self.slow_ms >= 0, "server.slow_ms must be 0 or more milliseconds")

    def replace_port(self, port: int) -> ServerSettings:
        return dataclasses.replace(self, port=port)


@dataclass(frozen=True)
class DaskSettings:
    scheduler: str = ""  # "" = start a LocalCluster; else tcp://HOST:8786
    shard_size: int = 100
    workers: int = 0  # LocalCluster worker processes; 0 = one per core

    def __post_init__(self) -> None:
        _check(self.shard_size >= 1, "dask.shard_size must be at least 1")
        _check(self.workers >= 0, "dask.workers must be 0 (one per core) or more")
        _check(
            not self.scheduler or "://" in self.scheduler,
            "dask.scheduler must look like tcp://HOST:8786",
        )


@dataclass(frozen=True)
class Settings:
    backend: str = "asyncio"
    count: int = 10
    url: str = DEFAULT_URL
    out: Path = Path("pic")
    width: int = 320
    height: int = 240
    keywords: str = ""
    local: bool = False
    progress: bool = True
    resume: bool = False
    retry_failed: bool = False
    urls: str = ""  # a URL list file, or "-" for stdin; replaces the template
    gray: bool = False
    match: str = ""  # "", "all" or "any": how loremflickr combines keywords
    unique: bool = False
    name_template: str = ""
    event_loop: str = "auto"  # asyncio backends: "auto" = uvloop when installed, "asyncio"
    workers: int = 0  # hybrid: event-loop processes; 0 = one per core
    http: HttpSettings = field(default_factory=HttpSettings)
    thumbnails: ThumbnailSettings = field(default_factory=ThumbnailSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    dask: DaskSettings = field(default_factory=DaskSettings)

    def __post_init__(self) -> None:
        # The Python API builds Settings directly: a str path is fine, a str count is not.
        if isinstance(self.out, str):
            object.__setattr__(self, "out", Path(self.out))
        for name, kind in _hints(Settings).items():
            value = getattr(self, name)
            if kind in (int, str, bool, Path) and not _is_a(value, kind):
                raise ConfigError(f"{name} must be {_kind_name(kind)}, got {value!r}")
        _check(self.count >= 1, "count must be at least 1")
        _check(self.width >= 1 and self.height >= 1, "width and height must be at least 1")
        _check(
            self.backend in BACKENDS,
            f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}",
        )
        _check(self.match in ("", "all", "any"), "match must be all or any")
        _check(self.workers >= 0, "workers must be 0 (one per core) or more")
        _check(self.event_loop in ("auto", "asyncio"), "event_loop must be auto or asyncio")
        _check(
            not (self.unique and (self.resume or self.retry_failed)),
            "--unique cannot be combined with --resume or --retry-failed",
        )
        _check(
            not (self.urls == "-" and (self.resume or self.retry_failed)),
            "--resume and --retry-failed need a URL list file, not stdin",
        )
        _check(not (self.urls and self.local), "--local serves URL templates, not --urls lists")
        if self.name_template:
            from .storage import check_name_template

            check_name_template(self.name_template)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _is_a(value: Any, kind: type[Any]) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------- loading

_SECTIONS: dict[str, Any] = {
    "http": HttpSettings,
    "thumbnails": ThumbnailSettings,
    "server": ServerSettings,
    "dask": DaskSettings,
}


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    # Resolving the string annotations is slow (~0.1 ms), and Settings is built often.
    return typing.get_type_hints(cls)


def known_keys() -> dict[str, type[Any]]:
    """Every dotted key and the type its value must have."""
    keys: dict[str, type[Any]] = {}
    for name, kind in _hints(Settings).items():
        if name not in _SECTIONS:
            keys[name] = kind
    for section, cls in _SECTIONS.items():
        for name, kind in _hints(cls).items():
            keys[f"{section}.{name}"] = kind
    return keys


def default_config_text() -> str:
    return resources.files("downloader").joinpath("default.toml").read_text("utf-8")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file not readable: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {path}") from None


def flatten(table: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``{"http": {"timeout": 3}}`` -> ``{"http.timeout": 3}``, rejecting unknown keys."""
    keys = known_keys()
    flat: dict[str, Any] = {}
    for name, value in table.items():
        if name in _SECTIONS and isinstance(value, Mapping):
            for sub, subvalue in value.items():
                flat[f"{name}.{sub}"] = subvalue
        else:
            flat[name] = value
    for key in flat:
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r} in {origin}")
    return flat


def from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``DOWNLOADER_HTTP_TIMEOUT=3`` -> ``{"http.timeout": "3"}``; unknown names are errors."""
    by_env = {"DOWNLOADER_" + k.upper().replace(".", "_"): k for k in known_keys()}
    out: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith("DOWNLOADER_"):
            continue
        if name not in by_env:
            raise ConfigError(f"unknown environment variable {name}")
        out[by_env[name]] = value
    return out


def coerce(key: str, value: Any, origin: str) -> Any:
    kind = known_keys()[key]
    where = f"{key} (from {origin})"
    if isinstance(value, str) and kind is not str:
        return _parse_text(kind, value, where)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ConfigError(f"{where} must be {_kind_name(kind)}, got {value!r}")


def _parse_text(kind: type[Any], text: str, where: str) -> Any:
    text = text.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is Path:
            return Path(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{where} must be {_kind_name(kind)}, got {text!r}") from None


def _kind_name(kind: type[Any]) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, "a path"
    )


def build(values: Mapping[str, Any]) -> Settings:
    """Dotted, already-coerced values -> ``Settings`` (validation runs in ``__post_init__``)."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section:
            sections[section][name] = value
        else:
            top[key] = value
    return Settings(**top, **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()})


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Shipped defaults <- ``config_file`` <- ``DOWNLOADER_*`` env <- ``overrides`` (flags)."""
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("default.toml", flatten(tomllib.loads(default_config_text()), "default.toml")),
    ]
    if config_file is not None:
        layers.append((str(config_file), flatten(read_toml(config_file), str(config_file))))
    layers.append(("environment", from_env(os.environ if environ is None else environ)))
    layers.append(("command line", dict(overrides or {})))
    values: dict[str, Any] = {}
    for origin, layer in layers:
        for key, value in layer.items():
            if value is not None:
                values[key] = coerce(key, value, origin)
    return build(values)
