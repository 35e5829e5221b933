"""Backend registry: name -> backend, imported lazily so ``--help`` stays fast."""

from __future__ import annotations

import importlib

from ..choices import BackendName
from ..errors import ConfigError
from .base import Backend, Emit

__all__ = ["BACKENDS", "Backend", "BackendName", "Emit", "get_backend"]

# The registry: adding a backend is one module, its name in ``choices.BackendName`` and
# its line here (a test checks the two agree); the CLI and the test suite's backend matrix
# read their backend names from here, the settings from ``choices``.
# name -> (module, class, the extra that provides its optional dependencies)
BACKENDS: dict[BackendName, tuple[str, str, str | None]] = {
    "sync": ("sync", "SyncBackend", None),
    "threads": ("threads", "ThreadsBackend", None),
    "asyncio": ("aio", "AsyncioBackend", None),
    "processes": ("processes", "ProcessesBackend", None),
    "hybrid": ("hybrid", "HybridBackend", None),
    "dask": ("dask", "DaskBackend", "dask"),
}


def get_backend(name: str) -> Backend:
    try:
        module_name, class_name, extra = BACKENDS[name]  # type: ignore[index]
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
