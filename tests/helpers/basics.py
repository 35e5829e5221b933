"""What most tests share: the backend matrix, settings for a test run, polling with a
deadline, a fake sleep, and skipping (or, under CI, failing) when something is missing."""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from PIL import Image

from downloader.backends import BACKENDS as REGISTRY
from downloader.backends import get_backend
from downloader.errors import ConfigError
from downloader.settings import DaskSettings, HttpSettings, Settings, ThumbnailSettings

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0  # how long a poll may wait before the test gives up (never reached normally)
T = TypeVar("T")

# The backend matrix is the registry's: a new backend cannot escape the contract tests.
# Backends that need an extra (dask: a LocalCluster of 2 workers, slow to start) run the
# contract suite when the extra is installed, and are left out of the longer suites.
BACKENDS = [name for name, (_, _, extra) in REGISTRY.items() if extra is None]


def unavailable(reason: str) -> NoReturn:
    """What a test needs is missing here: it fails under ``CI`` (CI must run every test)
    and is skipped elsewhere, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run it")
    pytest.skip(reason)


def _installed(name: str) -> bool:
    try:
        get_backend(name)
    except ConfigError:  # its extra is not installed
        return False
    return True


CONTRACT_BACKENDS = BACKENDS + [n for n in REGISTRY if n not in BACKENDS and _installed(n)]


def make_settings(backend: str, out: Path, url: str, count: int, **http: object) -> Settings:
    return Settings(
        backend=backend,
        count=count,
        url=url,
        out=out,
        progress=False,
        http=HttpSettings(
            **{
                "concurrency": 4,
                "timeout": 10.0,
                "retries": 2,
                "backoff": 0.01,
                "max_backoff": 0.05,
                **http,  # type: ignore[arg-type]
            }
        ),
        thumbnails=ThumbnailSettings(size=64),
        dask=DaskSettings(workers=2, shard_size=4),
    )


def decode_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def wait_for(
    condition: Callable[[], T],
    what: str = "the condition",
    *,
    seconds: float = DEADLINE_S,
    proc: subprocess.Popen[Any] | None = None,
) -> T:
    """Poll ``condition`` until it returns something true, and return that; fail if ``proc``
    exits first or after ``seconds`` (a deadline, never reached when things work)."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


class FakeSleep:
    """Records the waits a retry policy asks for instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class FakeAsyncSleep(FakeSleep):
    """FakeSleep for asyncio code: an awaitable sleep that records and returns at once."""

    async def __call__(self, seconds: float) -> None:  # type: ignore[override]
        self.calls.append(seconds)
