"""How a setting is declared and checked: ``setting()`` makes a dataclass field that carries
its bounds, help text and flag; ``Checked`` validates every declared field when a settings
dataclass is built, with one-line ``ConfigError``s."""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

_META = "downloader.setting"


@dataclass(frozen=True)
class Setting:
    """What is declared about one setting besides its type and default."""

    help: str
    flag: str | None = None  # "--timeout"; None: config file and environment only
    short: str | None = None  # "-n"
    low: float | None = None  # inclusive bounds
    high: float | None = None
    positive: bool = False  # must be more than 0 (a bound that excludes 0)
    metavar: str | None = None
    default_text: str | None = None  # what "[default: ...]" says, when the value would not
    parse: Callable[[str], Any] | None = None  # flag text -> value, e.g. "10/s" -> 10.0
    flag_value: Any = True  # what a boolean flag sets (``-q`` sets ``progress`` to False)
    commands: tuple[str, ...] = ("download",)  # the commands that take the flag


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A dataclass field declaring one setting (see ``Setting`` for what may be declared)."""
    return field(default=default, metadata={_META: Setting(help, **declared)})


class Checked:
    """Validates every declared field of a settings dataclass after it is built."""

    section = ""  # the dotted prefix of this dataclass's keys

    def __post_init__(self) -> None:
        cls: Any = type(self)
        for name, kind in hints(cls).items():
            meta = meta_of(cls, name)
            if meta is not None:
                _validate(f"{self.section}{name}", kind, getattr(self, name), meta)
        self.check()

    def check(self) -> None:
        """Rules that involve more than one field."""


@functools.cache
def hints(cls: type[Any]) -> dict[str, Any]:
    # Resolving the string annotations is slow (benchmarks/README.md), and Settings is
    # built often.
    return {k: v for k, v in typing.get_type_hints(cls).items() if k != "section"}


def meta_of(cls: Any, name: str) -> Setting | None:
    meta: Setting | None = cls.__dataclass_fields__[name].metadata.get(_META)
    return meta


def bare(kind: Any) -> Any:
    """``kind`` without its ``| None``: an option that may be left out (None: not given)
    has the type of the value it takes when given."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        given = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(given) == 1:
            return given[0]
    return kind


def _validate(key: str, kind: Any, value: Any, meta: Setting) -> None:
    if value is None and bare(kind) is not kind:
        return  # not given
    kind = bare(kind)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            named = ", ".join(c for c in choices if c)
            raise ConfigError(
                f"{key} must be one of {named}{' (or empty)' if '' in choices else ''}, "
                f"got {value!r}"
            )
        return
    if not _is_a(value, kind):
        raise ConfigError(f"{key} must be {kind_name(kind)}, got {value!r}")
    if kind in (int, float):
        _check_bounds(key, value, meta)


def _check_bounds(key: str, value: float, meta: Setting) -> None:
    low, high = meta.low, meta.high
    ok = not math.isnan(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    ok = ok and (not meta.positive or value > 0)
    if ok:
        return
    if meta.positive:
        extra = f", at most {high:g}" if high is not None else ""
        raise ConfigError(f"{key} must be a number above 0{extra}, got {value!r}")
    if low is not None and high is not None:
        raise ConfigError(f"{key} must be between {low:g} and {high:g}, got {value!r}")
    if low is not None:
        raise ConfigError(f"{key} must be at least {low:g}, got {value!r}")
    if high is not None:
        raise ConfigError(f"{key} must be at most {high:g}, got {value!r}")
    raise ConfigError(f"{key} must be a number, got {value!r}")


def _is_a(value: Any, kind: Any) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def kind_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, "a path"
    )
