"""Per-image spans: when each image waited on the network, computed, and wrote, and where
(process, thread, asyncio task slot). Measured by the shared steps in ``work``, so every
backend records them the same way; drawn by ``timeline_chart``.

Times are ``time.time()`` (CLOCK_REALTIME), one clock for every process of a run, Dask
workers on other machines included (as far as their clocks agree); the pipeline turns
them into seconds since the run began. Recording is off unless ``Settings.timeline``: then
no span is made and a Result's ``spans`` stays the empty tuple.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .result import Result

Phase = Literal["wait", "cpu", "write"]
PHASES: tuple[Phase, ...] = ("wait", "cpu", "write")


@dataclass(frozen=True, slots=True)
class Span:
    """One phase of one image. ``cpu``: for a ``cpu`` span, the CPU seconds its thread
    really used meanwhile (less than ``end - start`` when it waited for the GIL)."""

    index: int
    phase: Phase
    start: float
    end: float
    process: int
    thread: int
    slot: int | None = None  # asyncio and hybrid: the worker task that ran the image
    cpu: float | None = None

    def shifted(self, origin: float) -> Span:
        return dataclasses.replace(self, start=self.start - origin, end=self.end - origin)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Span:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True, slots=True)
class Ran:
    """Where and when the CPU stage ran, measured by the thread that ran it (a pool's
    thread or process, or the job's own)."""

    start: float
    end: float
    process: int
    thread: int
    cpu: float


class Laps:
    """One image's spans, phase after phase: ``wait``, then ``cpu``, then ``write``. Each
    ``next`` closes the phase in progress at this instant and opens the following one."""

    def __init__(self, index: int, slot: int | None = None) -> None:
        self.index = index
        self.slot = slot
        self.process = os.getpid()
        self.thread = threading.get_native_id()
        self.spans: list[Span] = []
        self._phase = 0
        self._since = time.time()

    def next(self, ran: Ran | None = None) -> None:
        """Close the phase in progress; ``ran``: the CPU stage's own account of itself
        (it may have run in another thread or process, later than it was asked for)."""
        now = time.time()
        if self._phase >= len(PHASES):
            return
        phase = PHASES[self._phase]
        if ran is not None:
            self.spans.append(
                Span(
                    self.index,
                    phase,
                    ran.start,
                    ran.end,
                    ran.process,
                    ran.thread,
                    self.slot,
                    ran.cpu,
                )
            )
        else:
            start = self._since
            self.spans.append(
                Span(self.index, phase, start, now, self.process, self.thread, self.slot)
            )
        self._phase += 1
        self._since = now

    def finish(self) -> tuple[Span, ...]:
        """The spans so far, with the phase in progress (a failed fetch's wait, a failed
        write) closed now."""
        self.next()
        self._phase = len(PHASES)
        return tuple(self.spans)


def ran_stage(stage: Callable[[bytes], Any], data: bytes) -> Any:
    """``stage(data)`` with a ``Ran`` attached to its ImageInfo (``ImageInfo.ran``): a
    module-level function, so a ``partial`` of it pickles to a process pool."""
    start, cpu = time.time(), time.thread_time()
    info = stage(data)
    ran = Ran(start, time.time(), os.getpid(), threading.get_native_id(), time.thread_time() - cpu)
    return dataclasses.replace(info, ran=ran)


# ---------------------------------------------------------------------------- reading


def most_at_once(spans: Iterable[Span], phase: Phase) -> int:
    """The most spans of ``phase`` in progress at one instant (one ending as another
    starts do not overlap)."""
    edges = sorted(
        (t, step) for s in spans if s.phase == phase for t, step in ((s.start, 1), (s.end, -1))
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def busy_s(spans: Iterable[Span]) -> float:
    """How long at least one of ``spans`` was in progress (their union's length)."""
    total, reach = 0.0, float("-inf")
    for span in sorted(spans, key=lambda s: s.start):
        if span.end > reach:
            total += span.end - max(span.start, reach)
            reach = span.end
    return total


@dataclass(frozen=True)
class CpuUse:
    """What the CPU spans really computed: ``share`` of their summed time, ``cores`` on
    average while any of them was in progress."""

    share: float
    cores: float


def cpu_use(spans: Iterable[Span]) -> CpuUse | None:
    timed = [s for s in spans if s.phase == "cpu" and s.cpu is not None]
    length = sum(s.end - s.start for s in timed)
    if not timed or length <= 0:
        return None
    used = sum(s.cpu or 0.0 for s in timed)
    return CpuUse(used / length, used / max(busy_s(timed), 1e-9))


def lanes(spans: Iterable[Span]) -> dict[int, list[int]]:
    """Each process's threads, both in the order they first appear."""
    order: dict[int, dict[int, None]] = {}
    for span in sorted(spans, key=lambda s: s.start):
        order.setdefault(span.process, {}).setdefault(span.thread, None)
    return {process: list(threads) for process, threads in order.items()}


def to_json(spans: Iterable[Span]) -> dict[str, Any]:
    return {"spans": [span.to_json() for span in spans]}


class SpanLog:
    """An ``Observer`` of a run that appends every result's spans to a JSON-lines file as
    it arrives (seconds since the run began), for a reader that follows the run live: the
    service's job page. The file is started afresh by each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._origin = 0.0

    def start(self, to_run: int | None, kept: int) -> None:
        if self._file is None:  # a --unique run starts once per round: one file for all
            self._origin = time.time()
            self._file = self.path.open("w", encoding="utf-8")

    def result(self, result: Result) -> None:
        if self._file is None or not result.spans:
            return
        lines = (json.dumps(s.shifted(self._origin).to_json()) + "\n" for s in result.spans)
        self._file.write("".join(lines))
        self._file.flush()  # a line at a time: the reader never waits for a buffer

    def __enter__(self) -> SpanLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()


MAX_PAGE = 5000  # spans in one answer: a page that polls gets the rest next time


def read_log(path: Path, after: int = 0, limit: int = MAX_PAGE) -> tuple[list[dict[str, Any]], int]:
    """At most ``limit`` spans of a ``SpanLog`` file from byte ``after`` on, and the cursor
    where what was read ends, so a page polling a long job reads each span once. A line
    still being written (no newline yet) is left for the next read; a line that does not
    parse (a disk that filled up mid-line) is passed over."""
    spans: list[dict[str, Any]] = []
    at = after
    try:
        with path.open("rb") as fh:
            fh.seek(after)
            for line in fh:
                if not line.endswith(b"\n") or len(spans) >= limit:
                    break
                at += len(line)
                with contextlib.suppress(ValueError):
                    spans.append(json.loads(line))
    except FileNotFoundError:
        pass
    return spans, at
