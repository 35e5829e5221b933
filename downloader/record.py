"""Recording a finished job: its manifest line, the report's counts, the observer."""

from __future__ import annotations

from typing import Protocol

from .manifest import ManifestWriter
from .result import Report, Result


class Observer(Protocol):
    """What a UI (the CLI's progress bar) hears from a run."""

    def start(self, to_run: int | None, kept: int) -> None: ...

    def result(self, result: Result) -> None: ...


class Recorder:
    """The pipeline's ``emit``: each Result a backend hands over, in the calling thread.

    The manifest line comes first: once a file is on disk, its line is what ``--resume``
    trusts; the report and the observer only count and show it.
    """

    def __init__(
        self,
        manifest: ManifestWriter,
        report: Report,
        observer: Observer | None = None,
        keep_results: bool = True,
    ) -> None:
        self.manifest = manifest
        self.report = report
        self.observer = observer
        self.keep_results = keep_results

    def start(self, to_run: int | None, kept: int) -> None:
        """Tell the observer how many jobs the run (or its next round) will fetch."""
        if self.observer is not None:
            self.observer.start(to_run, kept)

    def __call__(self, result: Result) -> None:
        self.manifest.write(result)
        self.report.add(result)
        if self.keep_results:
            self.report.results.append(result)
        if self.observer is not None:
            self.observer.result(result)
