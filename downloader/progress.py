"""Progress on a terminal (rich), and failure lines, for the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .pipeline import OnResult
from .result import Result
from .settings import Settings

MAX_FAILURE_LINES = 10


@contextlib.contextmanager
def progress_reporter(settings: Settings, verbose: int) -> Iterator[OnResult]:
    """An ``on_result`` callback that advances a progress bar (on a terminal, unless -q)
    and reports failures on stderr: all of them with -v, else the first few."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, highlight=False)
    show_bar = settings.progress and console.is_terminal
    failures = 0
    counts = {"ok": 0, "failed": 0}
    progress = Progress(
        TextColumn(f"[bold]{settings.backend}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show_bar,
        transient=False,
    )
    task = progress.add_task("download", total=settings.count, ok=0, failed=0)

    def on_result(result: Result) -> None:
        nonlocal failures
        counts[result.status] += 1
        progress.update(task, advance=1, ok=counts["ok"], failed=counts["failed"])
        if not result.ok:
            failures += 1
            if verbose or failures <= MAX_FAILURE_LINES:
                console.print(f"failed #{result.index}: {result.error}", markup=False)
            elif failures == MAX_FAILURE_LINES + 1:
                console.print("more failures: see manifest.jsonl (or use -v)", markup=False)

    with progress:
        yield on_result
