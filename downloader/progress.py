"""Progress on a terminal (rich), and failure lines, for the CLI."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .result import Result
from .settings import Settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

MAX_FAILURE_LINES = 10


class ProgressReporter:
    """A pipeline ``Observer``: a progress bar (on a terminal, unless -q) and failure
    lines on stderr: every one with -v, else the first few.

    Each line is one line whatever its length, so logs can be grepped: printed above the
    bar on a terminal (the terminal wraps it), written as it is otherwise. Without a bar,
    rich is never imported (a sizeable part of start-up; see benchmarks/README.md)."""

    def __init__(self, settings: Settings, verbose: int) -> None:
        self.verbose = verbose
        self.counts = {"ok": 0, "failed": 0}
        self.bar = _terminal_bar(settings.backend) if settings.progress else None
        self.task: TaskID | None = None
        if self.bar is not None:
            self.task = self.bar.add_task("download", total=None, ok=0, failed=0)

    def start(self, to_run: int | None, kept: int) -> None:
        if kept:
            rest = "the rest of the list" if to_run is None else to_run  # a streamed list
            self._say(f"resuming: {kept} images kept, {rest} to fetch")
        self._update(total=to_run)

    def result(self, result: Result) -> None:
        self.counts[result.status] += 1
        self._update(advance=1, ok=self.counts["ok"], failed=self.counts["failed"])
        if result.ok or (result.duplicate and not self.verbose):
            return
        failures = self.counts["failed"]
        if self.verbose or failures <= MAX_FAILURE_LINES:
            self._say(f"failed #{result.index}: {result.error}")
        elif failures == MAX_FAILURE_LINES + 1:
            self._say("more failures: see manifest.jsonl (or use -v)")

    def _update(self, **fields: Any) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, **fields)

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def __enter__(self) -> ProgressReporter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.stop()


def _terminal_bar(backend: str) -> Progress | None:
    """rich's progress bar on stderr, or None when stderr is not a terminal (as rich
    itself decides: FORCE_TERMINAL and the like count)."""
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
    if not console.is_terminal:
        return None
    return Progress(
        TextColumn(f"[bold]{backend}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
