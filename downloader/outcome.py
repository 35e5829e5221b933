"""How a run ends, as an exit code: the contract between the CLI, a service job's process,
the service's runner and ``download submit --wait``.

``for_report`` maps a finished run's ``Report`` to its code, ``guarded`` an error to its
code and one line on stderr. Every error a user can cause is one line and ``USAGE``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import click

from .errors import (
    RESUME,
    ClusterUnreachableError,
    ConfigError,
    DownloaderError,
    OutputInUseError,
    StorageError,
    StorageFaultError,
)

if TYPE_CHECKING:
    from .result import Report
    from .settings import Settings


class ExitCode(IntEnum):
    OK = 0  # every image ok
    FAILED = 1  # some images failed (or too few distinct ones), or the run could not finish
    USAGE = 2  # bad usage or configuration, OUT in use, a cluster out of reach; a refused job
    STORAGE = 3  # stopped by a storage fault (disk full, read-only, I/O error, OUT removed)
    # A service job's process only, where the CLI says USAGE: its folder is still held by
    # an earlier process of the job that is stopping, so the runner starts it again
    # (sysexits' EX_TEMPFAIL, "try again later").
    IN_USE = 75
    INTERRUPTED = 130  # Ctrl-C, SIGTERM, a cancelled job


def for_report(settings: Settings, report: Report) -> ExitCode:
    """OK all ok, FAILED some failed (or too few distinct images), STORAGE stopped by a
    storage fault, INTERRUPTED stopped before the end."""
    if report.fault:
        return ExitCode.STORAGE
    if report.interrupted:
        return ExitCode.INTERRUPTED
    if settings.unique and not settings.urls:  # a list has no count to reach
        return ExitCode.OK if (report.unique or 0) >= settings.count else ExitCode.FAILED
    return ExitCode.OK if report.failed == 0 else ExitCode.FAILED


def guarded(
    call: Callable[[], Any], way_on: str = RESUME, in_use: ExitCode = ExitCode.USAGE
) -> int:
    """Run ``call`` and turn what it raises into one line on stderr and an exit code.
    ``way_on``: what to do after a storage fault's fix; ``in_use``: the code for an OUT
    that another run holds."""
    try:
        code = call()
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        code = ExitCode.USAGE
    except StorageFaultError as exc:
        click.echo(f"error: {exc.fault.then(way_on)}", err=True)
        code = ExitCode.STORAGE
    except OutputInUseError as exc:
        click.echo(f"error: {exc}", err=True)
        code = in_use
    except (ConfigError, StorageError, ClusterUnreachableError) as exc:
        click.echo(f"error: {exc}", err=True)
        code = ExitCode.USAGE
    except DownloaderError as exc:  # a run that could not finish, e.g. every worker failed
        click.echo(f"error: {exc}", err=True)
        code = ExitCode.FAILED
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        code = ExitCode.INTERRUPTED
    return int(code) if isinstance(code, int) else ExitCode.OK
