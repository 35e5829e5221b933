"""downloader: parallel image downloads with interchangeable concurrency backends."""

from __future__ import annotations

from typing import Any

from .errors import (
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
from .settings import HttpSettings, ServerSettings, Settings, ThumbnailSettings, load_settings

__all__ = [
    "ConfigError",
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
    "StorageError",
    "StorageFaultError",
    "ThumbnailSettings",
    "download",
    "load_settings",
]

__version__ = "0.1.0"


def download(settings: Settings | None = None, **overrides: Any) -> Report:
    """Run a download from code: ``download(Settings(count=5, local=True))`` or
    ``download(count=5, local=True)``. Returns the ``Report`` with every ``Result``."""
    from .pipeline import run

    settings = (settings or Settings()).replace(**overrides) if overrides else settings
    return run(settings or Settings())
