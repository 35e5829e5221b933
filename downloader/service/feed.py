"""Following a job through its manifest, and handing what is new to event-stream listeners.

The job's process appends one JSON line per image to ``manifest.jsonl`` (flushed every
0.2 s); a resumed run starts a fresh file with the kept lines first and swaps it in. A
``Feed`` reads what is new (starting over on a swapped file, skipping lines it already
has), so its ``lines`` are every result so far, once each: what a late client replays
before the live ones.

A result's event id is ``EPOCH-N``: its position N in this feed's ``lines``, and the feed's
own random EPOCH. Positions hold only within one feed: a feed built again (the service
restarted, or an idle feed dropped) reads the manifest as it is now, where a retried job's
superseded lines are gone, so the same N may name another line. An id of another epoch
therefore replays every result (clients key results by index: a repeat replaces itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..manifest import parse_line
from ..storage import MANIFEST
from .store import JobRow
from .tally import Tally

OnNew = Callable[[str, list[Tally]], None]  # (job id, lines read for the first time)

QUEUE_LIMIT = 10_000  # events a slow listener may lag behind before it is dropped


@dataclass(frozen=True)
class Event:
    kind: str  # "result", "progress", "job", "end"; "close" ends a stream (shutdown, overflow)
    data: str = ""  # a result's manifest line (JSON text)
    id: str | None = None  # a result's "EPOCH-N" in its feed (for Last-Event-ID)
    job: JobRow | None = None  # the job (its counts so far) of "progress", "job" and "end"


CLOSE = Event("close")


class Topic:
    """Listeners of one stream: each has a bounded queue; one that falls too far behind
    gets a close (its client reconnects, with Last-Event-ID for a job's results)."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[Event]] = set()

    def publish(self, event: Event) -> None:
        for queue in list(self.queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(CLOSE)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_LIMIT)
        self.queues.add(queue)
        try:
            yield queue
        finally:
            self.queues.discard(queue)

    def close_all(self) -> None:
        for queue in list(self.queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(CLOSE)


@dataclass(frozen=True)
class _Entry:
    index: int
    line: str
    status: str  # "ok", "failed", "duplicate"
    paths: tuple[str, ...]
    bytes: int = 0
    elapsed_ms: float = 0.0

    def tally(self) -> Tally:
        status = "failed" if self.status == "failed" else "ok"
        return Tally(self.index, self.line, status, self.bytes, self.elapsed_ms / 1000)


class Feed:
    """The manifest of one job folder as the service has read it so far."""

    def __init__(self, out: Path, on_new: OnNew | None = None) -> None:
        self.path = out / MANIFEST
        self._job_id = out.name
        self._on_new = on_new
        self.topic = Topic()
        self.epoch = secrets.token_hex(4)
        self.lines: list[str] = []
        self.ok = 0
        self.failed = 0
        self._records: dict[int, _Entry] = {}
        self._paths: dict[str, int] = {}
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._lock = asyncio.Lock()

    def replay(self, last_event_id: str = "") -> list[Event]:
        """The results a client that last saw ``last_event_id`` has not seen: those after
        it when it is one of this feed's ids, else every one."""
        epoch, _, position = last_event_id.partition("-")
        skip = int(position) if epoch == self.epoch and position.isdigit() else 0
        return [self._event(i) for i in range(skip + 1, len(self.lines) + 1)]

    def _event(self, position: int) -> Event:
        return Event("result", self.lines[position - 1], f"{self.epoch}-{position}")

    def lists(self, path: str) -> bool:
        """Whether the manifest names ``path`` (an image or thumbnail) as it stands."""
        return path in self._paths

    async def poll(self) -> int:
        """Read what is new; publish each new result. Returns how many there were."""
        async with self._lock:
            entries = await asyncio.to_thread(self._read)
            return self._apply(entries)

    def _read(self) -> list[_Entry]:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return []
        with fh:
            stat = os.fstat(fh.fileno())
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._inode, self._offset, self._partial = stat.st_ino, 0, b""
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [entry for raw in complete if (entry := _parse(raw)) is not None]

    def _apply(self, entries: list[_Entry]) -> int:
        new = 0
        if self._on_new is not None and entries:
            self._on_new(self._job_id, [entry.tally() for entry in entries])
        for entry in entries:
            old = self._records.get(entry.index)
            if old is not None and old.line == entry.line:
                continue  # a kept line of a resumed run
            self._count(old, -1)
            self._count(entry, +1)
            self._records[entry.index] = entry
            self.lines.append(entry.line)
            new += 1
            self.topic.publish(self._event(len(self.lines)))
        return new

    def _count(self, entry: _Entry | None, sign: int) -> None:
        if entry is None:
            return
        if entry.status == "ok":
            self.ok += sign
        elif entry.status == "failed":
            self.failed += sign
        for path in entry.paths:
            if sign > 0:
                self._paths[path] = entry.index
            elif self._paths.get(path) == entry.index:
                del self._paths[path]


def _parse(raw: bytes) -> _Entry | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    result = parse_line(line)
    if result is None or result.status not in ("ok", "failed"):
        return None  # a torn line of a killed run
    status = "duplicate" if result.duplicate else result.status
    paths = tuple(p for p in (result.path, result.thumbnail) if p is not None)
    return _Entry(
        result.index, line, status, paths if status == "ok" else (), result.bytes,
        result.elapsed_ms,
    )  # fmt: skip


class Feeds:
    """The feed of every running job, and of a few others clients asked about lately
    (a feed holds its manifest's lines: it is dropped when nobody needs it)."""

    def __init__(self, jobs_dir: Path, keep: int = 4, on_new: OnNew | None = None) -> None:
        self._dir = jobs_dir
        self._on_new = on_new
        self._keep = keep
        self._feeds: dict[str, Feed] = {}  # least recently used first
        self._pinned: set[str] = set()

    def get(self, job_id: str) -> Feed:
        feed = self._feeds.pop(job_id, None) or Feed(self._dir / job_id, self._on_new)
        self._feeds[job_id] = feed
        idle = [k for k, f in self._feeds.items() if k not in self._pinned and not f.topic.queues]
        for key in idle[: max(0, len(idle) - self._keep)]:
            del self._feeds[key]
        return feed

    def peek(self, job_id: str) -> Feed | None:
        return self._feeds.get(job_id)

    def pin(self, job_id: str) -> Feed:
        self._pinned.add(job_id)
        return self.get(job_id)

    def unpin(self, job_id: str) -> None:
        self._pinned.discard(job_id)

    def close_all(self) -> None:
        for feed in self._feeds.values():
            feed.topic.close_all()
