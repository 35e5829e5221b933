"""Where settings come from, lowest first: the shipped ``default.toml`` < a ``--config``
file < ``DOWNLOADER_*`` environment variables < flags (or a service job's JSON body). Every
layer is flattened to dotted keys, checked against the declarations in ``settings`` and
coerced to the declared type; unknown keys and wrong types are one-line ``ConfigError``s."""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .declare import kind_name
from .errors import ConfigError
from .settings import SECTIONS, Settings, declared, known_keys


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
        if name in SECTIONS and isinstance(value, Mapping):
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
    by_env = {d.env: d.key for d in declared()}
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
    if typing.get_origin(kind) is Literal:
        kind = str  # the choices are checked when the Settings are built
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
        return _path(value)
    raise ConfigError(f"{where} must be {kind_name(kind)}, got {value!r}")


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
            return _path(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{where} must be {kind_name(kind)}, got {text!r}") from None


def _path(value: str | os.PathLike[str]) -> Path | str:
    """A path, or a URL kept as text (``Path`` would fold ``s3://b`` into ``s3:/b``): the
    settings tell a URL --out from a folder."""
    from .stores import is_url

    return value.strip() if isinstance(value, str) and is_url(value) else Path(value)


def build(values: Mapping[str, Any]) -> Settings:
    """Dotted, already-coerced values -> ``Settings`` (validation runs in ``__post_init__``)."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section:
            sections[section][name] = value
        else:
            top[key] = value
    return Settings(**top, **{name: cls(**sections[name]) for name, cls in SECTIONS.items()})


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
    if values.get("dataset.output_format", "files") != "files" and not any(
        layer.get("thumbnails.size") is not None for _, layer in layers[1:]
    ):
        values["thumbnails.size"] = 0  # thumbnails are off by default with shards
    return build(values)
