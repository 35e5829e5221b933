"""Optional dependencies: imported when a feature needs them, or a one-line error naming
the extra that installs them (never a silent fallback)."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError


def need(module: str, extra: str, what: str) -> Any:
    """``import module``, or a ``ConfigError`` saying ``what`` needs ``pip install
    'downloader[extra]'``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{what} needs the optional dependency {exc.name or module!r}: "
            f"pip install 'downloader[{extra}]'"
        ) from None
