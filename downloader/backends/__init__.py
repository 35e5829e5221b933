"""Backend registry: name -> backend, imported lazily so ``--help`` stays fast."""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Backend, Emit

__all__ = ["BACKENDS", "Backend", "Emit", "get_backend"]

# name -> (module, class, the extra that provides its optional dependencies)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "sync": ("sync", "SyncBackend", None),
    "threads": ("threads", "ThreadsBackend", None),
    "asyncio": ("aio", "AsyncioBackend", None),
    "processes": ("processes", "ProcessesBackend", None),
    "hybrid": ("hybrid", "HybridBackend", None),
    "dask": ("dask", "DaskBackend", "dask"),
}


def get_backend(name: str) -> Backend:
    try:
        module_name, class_name, extra = BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
        ) from None
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if extra is None or (exc.name or "").startswith("downloader"):
            raise
        raise ConfigError(
            f"backend {name!r} needs the optional dependency {exc.name!r}: "
            f"pip install 'downloader[{extra}]'"
        ) from None
    backend: Backend = getattr(module, class_name)()
    return backend
