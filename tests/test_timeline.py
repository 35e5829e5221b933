"""The timeline: per-image spans measured by every backend, and what they show about each
model of concurrency. Asserted from the JSON as structure and overlap counts with wide
margins, never as absolute seconds."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import ImageServer, invoke, make_settings, unavailable

from downloader.cli import main
from downloader.pipeline import run
from downloader.timeline import Laps, Span, busy_s, cpu_use, most_at_once


def _spans(data: dict[str, Any], backend: str) -> list[Span]:
    return [Span.from_json(span) for span in data["backends"][backend]["timeline"]["spans"]]


def _needs_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        unavailable("the timeline needs matplotlib (in the test extra)")


def _compare(tmp_path: Path, *args: str) -> dict[str, Any]:
    _needs_matplotlib()
    out_json, picture = tmp_path / "t.json", tmp_path / "t.png"
    cmd = ["compare", *args, "--json", str(out_json), "--timeline", str(picture)]
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 0, result.output + result.stderr
    assert picture.read_bytes().startswith(b"\x89PNG")
    data: dict[str, Any] = json.loads(out_json.read_text())
    return data


def _waiting(spans: list[Span]) -> dict[tuple[int, int], int]:
    """(process, thread) -> how many waits it ran."""
    where: dict[tuple[int, int], int] = defaultdict(int)
    for span in spans:
        if span.phase == "wait":
            where[(span.process, span.thread)] += 1
    return where


def test_each_backends_spans_show_its_model_of_concurrency(tmp_path: Path) -> None:
    args = ["-n", "12", "--backends", "sync,threads,asyncio,processes"]
    data = _compare(tmp_path, *args, "--latency-ms", "60", "--concurrency", "4")
    for backend in ("sync", "threads", "asyncio", "processes"):
        spans = _spans(data, backend)
        phases = defaultdict(list)
        for span in spans:
            phases[span.index].append(span.phase)
            assert 0 <= span.start <= span.end
        assert phases == {i: ["wait", "cpu", "write"] for i in range(12)}, backend

    sync = _spans(data, "sync")
    assert most_at_once(sync, "wait") == 1 and len(_waiting(sync)) == 1

    threads = _spans(data, "threads")
    assert most_at_once(threads, "wait") >= 2
    assert len(_waiting(threads)) >= 2 and len({s.process for s in threads}) == 1

    aio = _spans(data, "asyncio")
    assert most_at_once(aio, "wait") >= 3
    assert len(_waiting(aio)) == 1  # one thread of one process
    assert len({s.slot for s in aio if s.phase == "wait"}) >= 3  # several tasks

    processes = _spans(data, "processes")
    assert len({process for process, _ in _waiting(processes)}) >= 2


def test_threads_cpu_spans_holding_the_gil_compute_about_one_core(tmp_path: Path) -> None:
    args = ["--scenario", "gil", "-n", "12", "--concurrency", "4", "--python-cpu-ms", "20"]
    data = _compare(tmp_path, *args, "--backends", "threads")
    spans = _spans(data, "threads")
    cpu = [span for span in spans if span.phase == "cpu"]
    assert len(cpu) == 12 and all(span.cpu is not None for span in cpu)
    assert len({span.thread for span in cpu}) >= 2
    use = cpu_use(spans)
    assert use is not None
    # Four threads run the Python stage at once, but one GIL lets one compute: together
    # they use at most about one core (a margin for the thumbnail, which releases it).
    assert most_at_once(spans, "cpu") >= 2
    assert use.cores <= 1.3
    assert use.share < 0.9


def test_recording_is_off_by_default_and_never_reaches_the_manifest(tmp_path: Path) -> None:
    default = invoke(
        "-n", "3", "--local", "-q", "--backend", "sync", "--out", str(tmp_path / "default")
    )
    assert default.exit_code == 0, default.output
    for line in (tmp_path / "default" / "manifest.jsonl").read_text().splitlines():
        assert "spans" not in json.loads(line)

    from downloader import download

    report = download(count=2, local=True, out=tmp_path / "off", progress=False)
    assert report.spans == [] and all(result.spans == () for result in report.results)
    report = download(count=2, local=True, out=tmp_path / "rec", progress=False, timeline=True)
    assert len(report.spans) == 6 and all(len(result.spans) == 3 for result in report.results)


def test_a_failed_fetch_keeps_its_wait() -> None:
    laps = Laps(7, slot=2)
    (span,) = laps.finish()
    assert (span.index, span.phase, span.slot) == (7, "wait", 2)
    assert laps.finish() == (span,)


def test_overlap_counts() -> None:
    def span(start: float, end: float, phase: Any = "wait") -> Span:
        return Span(0, phase, start, end, 1, 1)

    spans = [span(0, 2), span(1, 3), span(2, 4), span(1.5, 1.6, "cpu")]
    assert most_at_once(spans, "wait") == 2  # one ending as another starts: no overlap
    assert most_at_once(spans, "cpu") == 1
    assert busy_s([span(0, 1), span(0.5, 2), span(3, 4)]) == pytest.approx(3.0)


def test_download_timeline_draws_a_single_run(tmp_path: Path) -> None:
    _needs_matplotlib()
    picture = tmp_path / "one.svg"
    result = invoke(
        "-n", "6", "--local", "-q", "--backend", "hybrid", "--workers", "2",
        "--out", str(tmp_path / "out"), "--timeline", str(picture),
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    assert "<svg" in picture.read_text()[:500]


@pytest.mark.parametrize(
    ("name", "fragment"), [("t.gif", ".png or .svg"), ("nowhere/t.png", "not a folder")]
)
def test_a_bad_timeline_file_is_one_line(tmp_path: Path, name: str, fragment: str) -> None:
    result = invoke(
        "-n", "1", "--local", "--out", str(tmp_path), "--timeline", str(tmp_path / name)
    )
    assert result.exit_code == 2 and fragment in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_a_run_whose_observer_keeps_the_spans_holds_none_in_its_report(
    image_server: ImageServer, tmp_path: Path
) -> None:
    settings = make_settings(
        "asyncio", tmp_path / "out", image_server.base + "/{width}/{height}?lock={i}", 3
    )
    settings = settings.replace(timeline=True)
    assert len(run(settings, keep_results=False).spans) == 9
    kept_elsewhere = run(
        settings.replace(out=tmp_path / "again"), keep_results=False, keep_spans=False
    )
    assert kept_elsewhere.ok == 3 and kept_elsewhere.spans == []
