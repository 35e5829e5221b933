"""The totals ``/metrics`` shows, kept in the store: every job's images, bytes and fetch
times, whatever process ran it, across restarts.

The service already follows each job's manifest; each line it reads for the first time is
tallied once (``tallied`` keeps a digest of the line per image, so a feed read again after
a restart, or a resumed run's kept lines, count nothing twice), in the same transaction as
the totals it adds to.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .store import Store

# Seconds; a fetch's elapsed time runs from ~1 ms (loopback) to the 30 s timeout.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Tally:
    """What one manifest line adds: its image's outcome, bytes and fetch time."""

    index: int
    line: str
    status: str  # "ok" or "failed"
    bytes: int
    elapsed_s: float


def tally(store: Store, job_id: str, entries: Iterable[Tally]) -> None:
    """Add the lines not tallied before to the totals, in one transaction."""
    db = store.db
    add: dict[str, float] = {}
    db.execute("BEGIN IMMEDIATE")
    try:
        for entry in entries:
            digest = hashlib.blake2b(entry.line.encode(), digest_size=12).hexdigest()
            old = db.execute(
                "SELECT digest FROM tallied WHERE job_id = ? AND idx = ?", (job_id, entry.index)
            ).fetchone()
            if old is not None and old[0] == digest:
                continue
            db.execute(
                "INSERT OR REPLACE INTO tallied (job_id, idx, digest) VALUES (?, ?, ?)",
                (job_id, entry.index, digest),
            )
            for name, value in _adds(entry):
                add[name] = add.get(name, 0.0) + value
        db.executemany(
            "INSERT INTO totals (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            add.items(),
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _adds(entry: Tally) -> Iterator[tuple[str, float]]:
    yield f"images_{entry.status}", 1
    yield "bytes", entry.bytes
    yield "fetch_count", 1
    yield "fetch_sum", entry.elapsed_s
    yield f"fetch_bucket_{bisect.bisect_left(BUCKETS, entry.elapsed_s)}", 1


def totals(store: Store) -> dict[str, float]:
    return dict(store.db.execute("SELECT name, value FROM totals").fetchall())
