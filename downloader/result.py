"""What a run produces: one ``Result`` per job, and a ``Report`` over all of them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import StorageFault
from .timeline import Span

DUPLICATE = "duplicate of image #"  # the error of a --unique duplicate, which is removed


@dataclass(frozen=True)
class Sample:
    """The image a shard keeps of a job, on its way from where the job ran to the shard
    writer: its bytes and their extension."""

    data: bytes
    ext: str


@dataclass(frozen=True)
class Result:
    """The outcome of one job: exactly one per index, and one manifest line each."""

    index: int
    url: str
    status: str  # "ok" | "failed"
    final_url: str | None = None
    path: str | None = None  # relative to OUT
    thumbnail: str | None = None  # relative to OUT
    bytes: int = 0
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    attempts: int = 0
    elapsed_ms: float = 0.0
    error: str | None = None
    # Dataset fields, in a manifest line only when set: the sample's key in its shard
    # (``path`` then names the shard), the input row's caption and additional columns,
    # the size before a resize, the sha256 of the file when it is not the downloaded bytes
    # (a resize, another format), and where a failure happened ("download" | "resize").
    key: str | None = None
    caption: str | None = None
    columns: dict[str, Any] | None = None
    original_width: int | None = None
    original_height: int | None = None
    saved_sha256: str | None = None
    stage: str | None = None
    # A storage fault that will hit every later image too (disk full, OUT gone...): its
    # cause and fix. Such a result stops the run and is never recorded.
    fault: StorageFault | None = None
    # A shard format's sample, for the shard writer; never in the manifest.
    sample: Sample | None = None
    # Its wait, cpu and write spans (Settings.timeline only); never in the manifest.
    spans: tuple[Span, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def duplicate(self) -> bool:
        return not self.ok and isinstance(self.error, str) and self.error.startswith(DUPLICATE)

    def to_record(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every value, once per result recorded
        # (its cost: benchmarks/README.md).
        record = {name: getattr(self, name) for name in _RESULT_FIELDS}
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Result:
        fields: dict[str, Any] = {
            k: record[k] for k in cls.__dataclass_fields__ if k in record and k not in _LOCAL
        }
        return cls(**fields)


_LOCAL = ("fault", "sample", "spans")  # never read from a manifest line
_OPTIONAL_FIELDS = (
    "key", "caption", "columns", "original_width", "original_height", "saved_sha256", "stage",
)  # fmt: skip
_RESULT_FIELDS = tuple(
    f.name for f in fields(Result) if f.name not in (*_LOCAL, *_OPTIONAL_FIELDS)
)  # always in a manifest line


@dataclass
class Report:
    """Aggregates of a run, as printed in the summary and by ``compare``."""

    backend: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # kept from an earlier run by --resume
    duplicates: int = 0  # --unique: fetched, same content as another, removed
    bytes: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    results: list[Result] = field(default_factory=list, repr=False)
    interrupted: bool = False  # stopped before the end (Ctrl-C, SIGTERM, a stop token)
    stop_reason: str | None = None  # what the stop token was set with
    unique: int | None = None  # --unique: distinct images kept
    note: str | None = None  # something the user must hear, e.g. why --unique gave up
    fault: StorageFault | None = None  # the storage fault that stopped the run
    spans: list[Span] = field(default_factory=list, repr=False)  # Settings.timeline: run's time

    def add(self, result: Result) -> None:
        if result.ok:
            self.ok += 1
            self.bytes += result.bytes
        elif result.duplicate:
            self.duplicates += 1
        else:
            self.failed += 1
        self.latencies_ms.append(result.elapsed_ms)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> str:
        parts = [
            f"{self.backend}: {self.ok} ok, {self.failed} failed",
            *([f"{self.skipped} kept"] if self.skipped else []),
            *([f"{self.duplicates} duplicates removed"] if self.unique is not None else []),
            f"in {self.wall_s:.2f} s",
            f"{self.images_per_s:.1f} images/s",
            f"{self.mb_per_s:.2f} MB/s",
            f"p50 {self.percentile(50):.0f} ms, p95 {self.percentile(95):.0f} ms",
        ]
        text = ", ".join(parts)
        if self.fault:
            return f"stopped: {text}"
        return f"interrupted: {text}" if self.interrupted else text
