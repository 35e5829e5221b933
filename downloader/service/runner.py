"""Runs queued jobs, at most ``max_jobs`` at once, each in a child process of its own.

The child (``downloader.service.job``) runs the CLI's pipeline on the job's folder; the
runner follows it through the manifest, keeps the store's counts and states, and tells
listeners. Exit codes are ``outcome.ExitCode``: OK and FAILED end ``done``; INTERRUPTED
after a cancel ends ``cancelled``, after a pause ``paused`` (``resume`` queues it again, to
go on as a retry does); IN_USE (its folder is held by an earlier child that is
still stopping) starts the child again a few times; anything else ends ``failed`` with the
child's last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..outcome import ExitCode
from .feed import Event, Feed, Feeds, Topic
from .spec import JobEnd
from .store import JobRow, Store

log = logging.getLogger("downloader.service")

POLL_S = 0.2  # the manifest is flushed every 0.2 s
TICK_S = 1.0  # progress events and stored counts, while they move
IN_USE_TRIES = 6
ENDED_DONE = (ExitCode.OK, ExitCode.FAILED)  # the run went through: some images may have failed
STOP_WAIT_S = 30.0


@dataclass
class _Active:
    row: JobRow
    feed: Feed
    proc: asyncio.subprocess.Process | None = None
    cancel: bool = False
    pause: bool = False

    @property
    def stopping(self) -> bool:
        return self.cancel or self.pause

    def stop(self) -> None:
        # One SIGTERM only: a second one makes the job's process exit at once (as a
        # second Ctrl-C does), which could leave a file without its manifest line.
        if not self.stopping and self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)


@dataclass
class _Outcome:
    code: int
    last_line: str = ""
    end: JobEnd | None = None
    tail: list[str] = field(default_factory=list)


class Runner:
    def __init__(
        self,
        store: Store,
        data: Path,
        max_jobs: int,
        events: Topic,
        feeds: Feeds,
        on_end: Callable[[JobRow], None] | None = None,
    ) -> None:
        self.store = store
        self.data = data
        self.max_jobs = max_jobs
        self.events = events
        self.feeds = feeds
        self._on_end = on_end
        self._active: dict[str, _Active] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for row in self.store.recover():
            log.info("job %s queued again, to resume", row.id)
        self._loop = asyncio.create_task(self._schedule())

    async def stop(self) -> None:
        """Stop running jobs as Ctrl-C stops a CLI run; they resume at the next start."""
        self._stopping.set()
        self._wake.set()
        for active in self._active.values():  # a job being cancelled has had its SIGTERM
            if not active.stopping and active.proc is not None and active.proc.returncode is None:
                active.proc.send_signal(signal.SIGTERM)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
        for active in self._active.values():  # pragma: no cover - a child that hangs
            if active.proc is not None and active.proc.returncode is None:
                active.proc.kill()
        if self._tasks:  # pragma: no cover
            await asyncio.wait(self._tasks)
        if self._loop is not None:
            await self._loop
        self.store.recover()

    @property
    def running(self) -> int:
        return len(self._active)

    def snapshot(self, row: JobRow) -> JobRow:
        """``row`` with the counts of its run so far, while it runs (the store has them
        only every ``TICK_S``)."""
        active = self._active.get(row.id)
        if active is None:
            return row
        return dataclasses.replace(row, ok=active.feed.ok, failed=active.feed.failed)

    # ------------------------------------------------------------------ requests

    def submitted(self, row: JobRow) -> None:
        log.info("job %s queued", row.id)
        self._changed(row)
        self._wake.set()

    def cancel(self, row: JobRow) -> bool:
        """Cancel a queued or running job; False when it has already ended."""
        active = self._active.get(row.id)
        if active is not None:
            active.stop()
            active.cancel, active.pause = True, False
            return True
        if row.state not in ("queued", "paused"):
            return False
        self._finished(self.store.move(row.id, "cancelled"))
        return True

    def pause(self, row: JobRow) -> bool:
        """Pause a queued or running job (a running one stops as a cancel stops it);
        False in any other state."""
        active = self._active.get(row.id)
        if active is not None:
            if active.cancel:
                return False
            active.stop()
            active.pause = True
            return True
        if row.state != "queued":
            return False
        self._changed(self.store.move(row.id, "paused"))
        return True

    def resume(self, row: JobRow) -> bool:
        """Queue a paused job again; it goes on as a retry does (a resumed run)."""
        if row.state != "paused" or row.id in self._active:
            return False
        self.submitted(self.store.move(row.id, "queued"))
        return True

    def reprioritize(self, row: JobRow, priority: int) -> bool:
        """A waiting job's new priority; False once it runs or has ended."""
        if row.state not in ("queued", "paused") or row.id in self._active:
            return False
        self._changed(self.store.set_fields(row.id, priority=priority))
        self._wake.set()
        return True

    def retry(self, row: JobRow) -> bool:
        if not row.final or row.id in self._active:
            return False
        self.submitted(self.store.move(row.id, "queued", error=None, finished_at=None))
        return True

    # ------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        while not self._stopping.is_set():
            while len(self._active) < self.max_jobs:
                row = self.store.next_queued(set(self._active))
                if row is None:
                    break
                self._active[row.id] = _Active(row, self.feeds.pin(row.id))
                task = asyncio.create_task(self._run_job(row.id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            await self._wake.wait()

    async def _run_job(self, job_id: str) -> None:
        active = self._active[job_id]
        try:
            await _reap_stale(active.row)
            outcome: _Outcome | None = None
            for attempt in range(IN_USE_TRIES):
                if active.stopping or self._stopping.is_set():
                    break
                outcome = await self._run_once(active)
                if outcome.code != ExitCode.IN_USE:
                    break
                log.info("job %s: its folder is still in use; trying again", job_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.25 * 2**attempt)
            if outcome is None:  # never started: cancelled, or the service is stopping
                if active.cancel:
                    self._finished(self.store.move(job_id, "cancelled"))
                elif active.pause:
                    self._changed(self.store.move(job_id, "paused"))
                return
            await active.feed.poll()
            self._end(active, outcome)
        except Exception:  # pragma: no cover - a bug here must not stop other jobs
            log.exception("job %s: the service failed to run it", job_id)
            self._finished(self.store.move(job_id, "failed", error="internal service error"))
        finally:
            del self._active[job_id]
            self.feeds.unpin(job_id)
            self._wake.set()

    async def _run_once(self, active: _Active) -> _Outcome:
        job_id = active.row.id
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOWNLOADER_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "downloader.service.job",
            str(self.data / "specs" / f"{job_id}.json"), str(self.data / "jobs" / job_id),
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        active.proc = proc
        if active.stopping or self._stopping.is_set():  # asked while it was starting
            proc.send_signal(signal.SIGTERM)
        row = self.store.start(job_id, proc.pid)
        active.row = row
        log.info("job %s running (pid %d)", job_id, proc.pid)
        self._changed(row)
        out_task = asyncio.create_task(_read_all(proc.stdout))
        err_task = asyncio.create_task(_read_lines(proc.stderr, job_id))
        await self._follow(active, proc)
        stdout, tail = await out_task, await err_task
        assert proc.stdin is not None
        proc.stdin.close()
        code = proc.returncode if proc.returncode is not None else -1
        return _Outcome(code, tail[-1] if tail else "", _job_end(stdout), tail)

    async def _follow(self, active: _Active, proc: asyncio.subprocess.Process) -> None:
        exited = asyncio.create_task(proc.wait())
        counts = (0, 0)
        last_tick = time.monotonic()
        while not exited.done():
            await asyncio.wait([exited], timeout=POLL_S)
            await active.feed.poll()
            if time.monotonic() - last_tick >= TICK_S:
                last_tick = time.monotonic()
                job = self.snapshot(active.row)
                active.feed.topic.publish(Event("progress", job=job))
                if (job.ok, job.failed) != counts:
                    counts = (job.ok, job.failed)
                    self.store.set_counts(job.id, *counts)
                    self.events.publish(Event("job", job=job))

    # ------------------------------------------------------------------ endings

    def _end(self, active: _Active, outcome: _Outcome) -> None:
        job_id, code, feed = active.row.id, outcome.code, active.feed
        self.store.set_counts(job_id, feed.ok, feed.failed)
        if self._stopping.is_set() and not active.stopping and code not in ENDED_DONE:
            log.info("job %s stopped with the service; it resumes at the next start", job_id)
            return  # still "running" in the store: stop() queues it again
        end = outcome.end
        fields = {"summary": end.summary, "images_per_s": end.images_per_s} if end else {}
        if code in ENDED_DONE:
            row = self.store.move(job_id, "done", error=None, **fields)
        elif active.cancel:
            row = self.store.move(job_id, "cancelled", **fields)
        elif active.pause and code == ExitCode.INTERRUPTED:
            self._changed(self.store.move(job_id, "paused", **fields))
            return
        else:
            row = self.store.move(job_id, "failed", error=_reason(outcome))
        self._finished(row)

    def _finished(self, row: JobRow) -> None:
        detail = row.summary or row.error or ""
        log.info("job %s %s%s", row.id, row.state, f": {detail}" if detail else "")
        job = self._changed(row)
        feed = self.feeds.peek(row.id)
        if feed is not None:
            feed.topic.publish(Event("end", job=job))
        if self._on_end is not None:
            self._on_end(job)

    def _changed(self, row: JobRow) -> JobRow:
        job = self.snapshot(row)
        self.events.publish(Event("job", job=job))
        return job


def _reason(outcome: _Outcome) -> str:
    line = outcome.last_line.removeprefix("error: ").strip()
    if outcome.code < 0:
        name = signal.Signals(-outcome.code).name
        return f"the job's process was killed by {name}" + (f" ({line})" if line else "")
    if outcome.code == ExitCode.INTERRUPTED:
        return f"the job's process was interrupted (exit code {ExitCode.INTERRUPTED:d})"
    return line or f"the job's process exited with code {outcome.code}"


def _job_end(stdout: bytes) -> JobEnd | None:
    lines = reversed(stdout.decode("utf-8", "replace").splitlines())
    return next((end for line in lines if (end := JobEnd.from_json(line)) is not None), None)


async def _read_all(stream: asyncio.StreamReader | None) -> bytes:
    return await stream.read() if stream is not None else b""


async def _read_lines(stream: asyncio.StreamReader | None, job_id: str) -> list[str]:
    """The child's stderr, logged line by line; its last few lines are kept."""
    tail: list[str] = []
    if stream is None:
        return tail
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            log.info("job %s: %s", job_id, line)
            tail = [*tail[-4:], line]
    return tail


async def _reap_stale(row: JobRow) -> None:
    """Wait for the process of this job a killed service left behind (it stops when it
    notices its parent is gone), so two processes never work on one folder."""
    if row.pid is None or not _is_job_process(row.pid, row.id):
        return
    log.info("job %s: waiting for its previous process (pid %d) to stop", row.id, row.pid)
    deadline = time.monotonic() + STOP_WAIT_S
    while _is_job_process(row.pid, row.id):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(row.pid, signal.SIGKILL)
        await asyncio.sleep(0.05)


def _is_job_process(pid: int, job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return (
        state != "Z"
        and b"downloader.service.job" in cmdline
        and any(job_id.encode() in part for part in cmdline)
    )
