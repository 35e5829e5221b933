"""The process one service job runs in: ``python -m downloader.service.job SPEC OUT PARENT``.

It runs the CLI's pipeline on ``OUT`` (``--resume`` once a manifest is there), prints one
JSON ``JobEnd`` line on stdout and exits with the CLI's codes (``outcome.ExitCode``; an OUT
still held by an earlier process of the job is ``IN_USE``, for the runner to retry). It
never outlives the service: the service holds the other end of its stdin, so EOF means the
service is gone (however it died), and a parent-death signal backs that up; either sets
the run's stop token (as Ctrl-C does), and a stop that does not finish in ``GRACE_S``
exits at once. The service's cancel is SIGTERM, which the pipeline turns into the same
stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from ..outcome import ExitCode, for_report, guarded
from ..stop import StopToken
from ..storage import MANIFEST
from ..timeline import SpanLog
from .spec import JobEnd, JobSpec, job_settings

GRACE_S = 20.0
TIMELINE = ".timeline.jsonl"  # in OUT, hidden like the lock: the latest run's spans
_PR_SET_PDEATHSIG = 1
STOP = StopToken()
# After a storage fault's fix, a job goes on with the service's retry.
WAY_ON = "retry the job"


def _service_gone() -> None:
    """Stop the run as Ctrl-C does; give up waiting after ``GRACE_S``: nobody is watching."""
    if STOP.is_set():
        return
    timer = threading.Timer(GRACE_S, os._exit, args=(ExitCode.INTERRUPTED,))
    timer.daemon = True
    timer.start()
    STOP.set("the service is gone")


def _watch_parent(parent: int) -> None:
    def watch_stdin() -> None:
        while os.read(0, 65536):
            pass
        _service_gone()

    signal.signal(signal.SIGUSR1, _on_parent_death)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    if os.getppid() != parent:  # gone before the signal was armed
        _service_gone()
    threading.Thread(target=watch_stdin, daemon=True, name="service-watch").start()


def _on_parent_death(signum: int, frame: FrameType | None) -> None:
    _service_gone()


def _run(spec_path: Path, out: Path) -> int:
    from ..pipeline import run

    spec = JobSpec.from_json(spec_path.read_text("utf-8"))
    urls = spec_path.with_suffix(".urls") if spec.urls is not None else None
    values = dict(spec.values)
    values["resume"] = (out / MANIFEST).exists()
    # Spans for the job's page (its timeline): a few microseconds an image.
    settings = job_settings(values, out, urls).replace(timeline=True)
    with SpanLog(out / TIMELINE) as spans:
        report = run(settings, spans, keep_results=False, stop=STOP, keep_spans=False)
    end = JobEnd(report.summary(), report.images_per_s, report.note)
    print(end.to_json(), flush=True)
    if report.fault:  # the job ends failed, with this line as its error
        print(f"error: {report.fault.then(WAY_ON)}", file=sys.stderr, flush=True)
    return for_report(settings, report)


def main(argv: list[str] | None = None) -> int:
    spec, out, parent = argv if argv is not None else sys.argv[1:]
    _watch_parent(int(parent))
    return guarded(lambda: _run(Path(spec), Path(out)), WAY_ON, in_use=ExitCode.IN_USE)


if __name__ == "__main__":
    sys.exit(main())
