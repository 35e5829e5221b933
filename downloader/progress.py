"""Progress on a terminal (rich), and failure lines, for the CLI."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .result import Result
from .settings import Settings

MAX_FAILURE_LINES = 10


class ProgressReporter:
    """A pipeline ``Observer``: a progress bar (on a terminal, unless -q) and failure
    lines on stderr: every one with -v, else the first few."""

    def __init__(self, settings: Settings, verbose: int) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.verbose = verbose
        self.counts = {"ok": 0, "failed": 0}
        self.progress = Progress(
            TextColumn(f"[bold]{settings.backend}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (settings.progress and self.console.is_terminal),
        )
        self.task = self.progress.add_task("download", total=None, ok=0, failed=0)

    def start(self, to_run: int | None, kept: int) -> None:
        if kept:
            self.console.print(f"resuming: {kept} images kept, {to_run} to fetch", markup=False)
        self.progress.update(self.task, total=to_run)

    def result(self, result: Result) -> None:
        self.counts[result.status] += 1
        ok, failed = self.counts["ok"], self.counts["failed"]
        self.progress.update(self.task, advance=1, ok=ok, failed=failed)
        if result.ok or (result.duplicate and not self.verbose):
            return
        failures = self.counts["failed"]
        if self.verbose or failures <= MAX_FAILURE_LINES:
            self.console.print(f"failed #{result.index}: {result.error}", markup=False)
        elif failures == MAX_FAILURE_LINES + 1:
            self.console.print("more failures: see manifest.jsonl (or use -v)", markup=False)

    def __enter__(self) -> ProgressReporter:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()
