"""``download service``: check the settings, lock the data folder, serve until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from ..errors import ConfigError, OutputInUseError
from ..lock import OutputLock
from ..netguard import is_loopback
from ..outcome import ExitCode
from ..settings import Settings
from .app import make_app

log = logging.getLogger("downloader.service")
LOCK = "service.lock"


def run_service(settings: Settings) -> int:
    config = settings.service
    if not config.token and not is_loopback(config.host):
        raise ConfigError(
            f"listening on {config.host} needs a token (--token or DOWNLOADER_SERVICE_TOKEN)"
        )
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s", force=True
    )
    with _data_lock(config.data):
        asyncio.run(_serve(settings))
    return ExitCode.OK


@contextlib.contextmanager
def _data_lock(data: Path) -> Iterator[None]:
    """One service per data folder: its database and job folders have one owner."""
    lock = OutputLock(data, LOCK, what="data folder")
    try:
        lock.acquire()
    except OutputInUseError as exc:
        owner = exc.pid or "?"
        raise ConfigError(f"{data} is in use by another service (pid {owner})") from None
    try:
        yield
    finally:
        lock.release()


async def _serve(settings: Settings) -> None:
    config = settings.service
    runner = web.AppRunner(make_app(settings), access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
            ) from None
        host, port = runner.addresses[0][:2]
        log.info(
            "serving on http://%s:%d (data %s, at most %d jobs at once); Ctrl-C stops",
            host if ":" not in host else f"[{host}]", port, config.data, config.max_jobs,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: running jobs resume at the next start")
    finally:
        await runner.cleanup()
