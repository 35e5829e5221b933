"""downloader: parallel image downloads with interchangeable concurrency backends."""

from __future__ import annotations

from typing import Any

from .config import load_settings
from .errors import (
    ClusterUnreachableError,
    ConfigError,
    DownloaderError,
    FetchError,
    InvalidImageError,
    OutputInUseError,
    RetryableFetchError,
    StorageError,
    StorageFaultError,
)
from .result import Report, Result
from .settings import DatasetSettings, HttpSettings, ServerSettings, Settings, ThumbnailSettings
from .stop import StopToken

__all__ = [
    "ClusterUnreachableError",
    "ConfigError",
    "DatasetSettings",
    "DownloaderError",
    "FetchError",
    "HttpSettings",
    "InvalidImageError",
    "OutputInUseError",
    "Report",
    "Result",
    "RetryableFetchError",
    "ServerSettings",
    "Settings",
    "StopToken",
    "StorageError",
    "StorageFaultError",
    "ThumbnailSettings",
    "download",
    "load_settings",
]

__version__ = "0.1.0"


def download(
    settings: Settings | None = None, *, stop: StopToken | None = None, **overrides: Any
) -> Report:
    """Run a download from code: ``download(Settings(count=5, local=True))`` or
    ``download(count=5, local=True)``. Returns the ``Report`` with every ``Result``.

    ``stop``: set it (from any thread) to stop the run cleanly; the report then says
    ``interrupted``. Runs outside the main thread too (then Ctrl-C is the caller's).

    A run stopped by a storage fault (disk full, OUT removed or read-only...) raises
    ``StorageFaultError`` once it has stopped; its ``report`` is the run's, complete.
    """
    from .pipeline import run

    settings = (settings or Settings()).replace(**overrides) if overrides else settings
    report = run(settings or Settings(), stop=stop)
    if report.fault:
        raise StorageFaultError(report.fault, report=report)
    return report
