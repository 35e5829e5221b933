"""Recording a finished job: its manifest line, the report's counts, the observer."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

from .errors import StorageFaultError
from .manifest import ManifestWriter
from .result import Report, Result
from .shards import ShardSet, hand_over
from .stop import StopToken


class Observer(Protocol):
    """What a UI (the CLI's progress bar) hears from a run."""

    def start(self, to_run: int | None, kept: int) -> None: ...

    def result(self, result: Result) -> None: ...


@dataclass
class Recorder:
    """The pipeline's ``emit``: each Result a backend hands over, in the calling thread.

    The manifest line comes first: once a file is on disk, its line is what ``--resume``
    trusts; the report and the observer only count and show it.

    A storage fault (a Result marked ``fault``, or a manifest line that cannot be written)
    sets ``stop`` with its one-line reason, and from then on nothing is recorded: the
    images still in flight are not blamed, their files are removed, and ``--resume``
    fetches them again.
    """

    manifest: ManifestWriter
    report: Report
    observer: Observer | None = None
    keep_results: bool = True
    keep_spans: bool = True
    stop: StopToken | None = None
    shards: ShardSet | None = None  # a shard format: samples go there before their line
    # When the run began, on the spans' clock (Settings.timeline): they are kept relative to it.
    origin: float = field(default_factory=time.time)

    def start(self, to_run: int | None, kept: int) -> None:
        """Tell the observer how many jobs the run (or its next round) will fetch."""
        if self.observer is not None:
            self.observer.start(to_run, kept)

    def __call__(self, result: Result) -> None:
        if self.shards is not None:
            result = self._to_shard(result)
        if result.fault:
            self.manifest.fail(result.fault)
        try:
            self.manifest.write(result)  # after a fault: removes the result's files, raises
        except StorageFaultError as exc:
            if self.report.fault is None:
                self.report.fault = exc.fault
                if self.stop is not None:
                    self.stop.set(str(exc))
            return
        self.report.add(result)
        if result.spans and self.keep_spans:
            self.report.spans.extend(span.shifted(self.origin) for span in result.spans)
        if self.keep_results:
            self.report.results.append(result)
        if self.observer is not None:
            self.observer.result(result)

    def _to_shard(self, result: Result) -> Result:
        """Hand the row to its shard (a sample is in the shard's temp file before its line
        is written), and keep the Result without the sample: a report of 10^5 images holds
        no image bytes."""
        shards = self.shards
        if shards is None or self.manifest.fault is not None:
            return dataclasses.replace(result, sample=None)
        return hand_over(shards.add, result, shards.out)
