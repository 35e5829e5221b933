"""The job store: one SQLite database (WAL), every state change in one transaction.

The service's event loop is its only user, and every statement touches one row or a
page of rows, so calls stay well under a millisecond and run on the loop. WAL with
``synchronous = NORMAL`` survives a kill -9 of the service (the OS has the pages); a
power cut may lose the last transactions, never the database.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "paused", "done", "failed", "cancelled")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_seq INTEGER NOT NULL,
    queue_seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    ok INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    total INTEGER,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    images_per_s REAL,
    summary TEXT,
    error TEXT,
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tallied (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    payload TEXT NOT NULL,
    give_up_at REAL NOT NULL
);
"""
# Columns added after the first release: an older database gets them on open.
_ADDED = {
    "priority": "INTEGER NOT NULL DEFAULT 0",
    "webhook": "TEXT",
    "delivery": "TEXT",
}
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, priority DESC, queue_seq);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_seq);
"""
_FIELDS = (
    "id", "body", "state", "ok", "failed", "total", "created_at", "started_at",
    "finished_at", "images_per_s", "summary", "error", "pid", "priority", "webhook",
    "delivery",
)  # fmt: skip
_COLUMNS = ", ".join(_FIELDS)


def now() -> str:
    """ISO 8601 in UTC, to the millisecond: ``2026-11-30T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobRow:
    id: str
    body: str  # the JSON body as the client sent it (compact JSON)
    state: str
    ok: int
    failed: int
    total: int | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    images_per_s: float | None
    summary: str | None
    error: str | None
    pid: int | None
    priority: int = 0
    webhook: str | None = None
    delivery: str | None = None  # how the webhook's delivery went (a JSON object)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class Transition:
    job_id: str
    state: str
    at: str


class Store:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        with self._tx() as db:
            for name, kind in _ADDED.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        self._db.executescript(_INDEXES)

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the tables of ``tally`` and ``webhooks`` (same loop)."""
        return self._db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _record(self, job_id: str, state: str, at: str) -> None:
        self._db.execute(
            "INSERT INTO history (job_id, state, at) VALUES (?, ?, ?)", (job_id, state, at)
        )

    def add(
        self, job_id: str, body: str, total: int | None, priority: int = 0,
        webhook: str | None = None,
    ) -> JobRow:  # fmt: skip
        at = now()
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(created_seq), 0) + 1 FROM jobs").fetchone()[0]
            queue = db.execute("SELECT COALESCE(MAX(queue_seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, created_seq, queue_seq, body, state, total, created_at, "
                "priority, webhook) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, seq, queue, body, total, at, priority, webhook),
            )
            self._record(job_id, "queued", at)
        return self._must_get(job_id)

    def get(self, job_id: str) -> JobRow | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    def _must_get(self, job_id: str) -> JobRow:
        row = self.get(job_id)
        if row is None:  # pragma: no cover - ids come from the store
            raise KeyError(job_id)
        return row

    def jobs(self, limit: int, state: str | None = None) -> list[JobRow]:
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created_seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [JobRow(*row) for row in rows]

    def next_queued(self, skip: set[str]) -> JobRow | None:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' "
            "ORDER BY priority DESC, queue_seq LIMIT ?",
            (len(skip) + 1,),
        ).fetchall()
        return next((JobRow(*row) for row in rows if row[0] not in skip), None)

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def start(self, job_id: str, pid: int) -> JobRow:
        return self.move(job_id, "running", started_at=now(), finished_at=None, pid=pid,
                         error=None, summary=None)  # fmt: skip

    def move(self, job_id: str, state: str, **fields: Any) -> JobRow:
        """Set ``state`` (and ``fields``) and record the transition, in one transaction.
        A job queued again (a retry) goes to the back of the queue."""
        at = now()
        if state in FINAL_STATES:
            fields.setdefault("finished_at", at)
        sets = ["state = ?", *(f"{name} = ?" for name in fields)]
        if state == "queued":
            sets.append("queue_seq = (SELECT MAX(queue_seq) + 1 FROM jobs)")
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?",
                (state, *fields.values(), job_id),
            )
            self._record(job_id, state, at)
        return self._must_get(job_id)

    def set_fields(self, job_id: str, **fields: Any) -> JobRow:
        """Fields that are not a change of state (priority, delivery), in one statement."""
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))
        return self._must_get(job_id)

    def set_counts(self, job_id: str, ok: int, failed: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET ok = ?, failed = ? WHERE id = ?", (ok, failed, job_id))

    def recover(self) -> list[JobRow]:
        """After a stop or a crash: jobs that were running wait again, first in the queue
        (their old place), to resume. Returns them as they were (with the old pid)."""
        was_running = [JobRow(*r) for r in self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running'").fetchall()]  # fmt: skip
        at = now()
        with self._tx() as db:
            for job in was_running:
                db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", (job.id,))
                self._record(job.id, "queued", at)
        return was_running

    def history(self, job_id: str | None = None) -> list[Transition]:
        where, args = ("WHERE job_id = ?", (job_id,)) if job_id else ("", ())
        rows = self._db.execute(
            f"SELECT job_id, state, at FROM history {where} ORDER BY seq", args
        ).fetchall()
        return [Transition(*row) for row in rows]
