"""compare: real child-process runs of two backends against the built-in server."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import invoke, unavailable

from downloader import busywork, work
from downloader.choices import ScenarioName
from downloader.cli import main
from downloader.compare import (
    Outcome,
    Row,
    Run,
    default_backends,
    settings_from_json,
    settings_to_json,
)
from downloader.errors import ConfigError
from downloader.scenarios import ALL, SCENARIOS, CompareSettings
from downloader.scoreboard import advice, verdict, write_chart, write_json
from downloader.server import render_photo
from downloader.settings import Settings, ThumbnailSettings, declarations, known_keys
from downloader.thumbnails import ImageInfo, inspect_image
from downloader.work import cpu_stage


def test_settings_round_trip_through_json() -> None:
    settings = Settings(count=7, backend="threads", out=Path("x"), keywords="cat")
    assert settings_from_json(settings_to_json(settings)) == settings


def test_verdict_names_the_winner_and_the_ratio() -> None:
    def row(name: str, wall: float) -> Row:
        return Row(name, [Run(name, 0, 10, 0, 1000, wall, 1.0, 50.0, 1.0, 2.0)])

    text = verdict([row("sync", 4.0), row("asyncio", 1.0), row("threads", 2.0)])
    assert text == "asyncio won: 2.00x faster than threads, 4.00x faster than sync"
    assert verdict([row("sync", 3.0), row("asyncio", 1.5)]) == "asyncio won: 2.00x faster than sync"


def test_compare_runs_each_backend_and_writes_json(tmp_path: Path) -> None:
    out_json = tmp_path / "cmp.json"
    keep = tmp_path / "runs"
    result = CliRunner().invoke(
        main,
        [
            "compare",
            "-n",
            "6",
            "--backends",
            "sync,asyncio",
            "--latency-ms",
            "20",
            "--concurrency",
            "3",
            "--repeat",
            "2",
            "--json",
            str(out_json),
            "--keep",
            str(keep),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sync" in result.output and "asyncio" in result.output
    assert " won: " in result.output
    data = json.loads(out_json.read_text())
    assert set(data["backends"]) == {"sync", "asyncio"}
    for numbers in data["backends"].values():
        assert len(numbers["runs"]) == 2
        for run in numbers["runs"]:
            assert run["ok"] == 6 and run["failed"] == 0
            assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["peak_rss_mb"] > 0
    # A fresh output folder per run, each with its own complete manifest.
    for name in ("sync-0", "sync-1", "asyncio-0", "asyncio-1"):
        assert len((keep / name / "manifest.jsonl").read_text().splitlines()) == 6


def test_compare_rejects_unknown_backend() -> None:
    result = CliRunner().invoke(main, ["compare", "--backends", "sync,bogus"])
    assert result.exit_code == 2
    assert "bogus" in result.stderr and "Traceback" not in result.output + result.stderr


def needs_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        unavailable("the chart needs matplotlib (in the test extra: pip install -e '.[test]')")


def test_chart_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import fails, as if absent
    result = CliRunner().invoke(main, ["compare", "-n", "2", "--chart", str(tmp_path / "c.png")])
    assert result.exit_code == 2
    assert "downloader[chart]" in result.stderr
    assert not (tmp_path / "c.png").exists()


def test_chart_is_a_png(tmp_path: Path) -> None:
    needs_matplotlib()
    chart = tmp_path / "c.png"
    result = CliRunner().invoke(
        main, ["compare", "-n", "2", "--backends", "sync", "--chart", str(chart)]
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert chart.read_bytes().startswith(b"\x89PNG")


def _cpu_per_wall_on_two_threads(work: Callable[[], object], calls: int = 2) -> float:
    """Run ``work`` ``calls`` times on each of 2 threads at once: this process's CPU time
    over the wall time (about 2 where both threads run on a core each, 1 under one GIL)."""
    barrier = threading.Barrier(3)

    def loop() -> None:
        barrier.wait()
        for _ in range(calls):
            work()

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    cpu, wall = time.process_time(), time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def test_the_python_stage_holds_the_gil(record_property: Callable[[str, object], None]) -> None:
    """Two threads running the gil stage use one core at most, whatever else the machine
    does; Pillow's thumbnail on 2 threads may use both (reported, not asserted: it needs
    2 free cores to show)."""
    tiny = render_photo(32, 24, 0, seed=0)
    stage = cpu_stage(Settings(thumbnails=ThumbnailSettings(size=0, python_cpu_ms=150)))
    assert _cpu_per_wall_on_two_threads(lambda: stage(tiny)) < 1.3
    big = render_photo(1920, 1080, 0, seed=0)
    pillow = _cpu_per_wall_on_two_threads(lambda: inspect_image(big, 128), calls=6)
    record_property("pillow_cpu_per_wall_on_2_threads", round(pillow, 2))
    print(f"Pillow's thumbnail on 2 threads: CPU time / wall time = {pillow:.2f}")


def test_the_python_stage_runs_after_the_thumbnail_and_pickles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(busywork, "burn", lambda ms, seed=1: calls.append(f"burn {ms}") or seed)
    data = render_photo(64, 48, 1, seed=0)
    plain = cpu_stage(Settings())
    with_python = Settings(thumbnails=ThumbnailSettings(python_cpu_ms=7))
    staged = cpu_stage(with_python)
    assert pickle.loads(pickle.dumps(staged))(data) == plain(data) == inspect_image(data, 128)
    assert calls == ["burn 7"]  # the unpickled copy ran it; the plain stage did not

    def recording(data: bytes, **kwargs: Any) -> ImageInfo:
        calls.append("thumbnail")
        return inspect_image(data, **kwargs)

    calls.clear()
    monkeypatch.setattr(work, "inspect_image", recording)  # read when the stage is built
    assert cpu_stage(with_python)(data) == inspect_image(data, 128)
    assert calls == ["thumbnail", "burn 7"]
    assert busywork.steps_for(0) == 0 < busywork.steps_for(1) < busywork.steps_for(2)


FORKSERVER_WORK = """\
import multiprocessing, sys, time
from downloader import busywork, work

def work():
    busywork.burn(300)
    return time.process_time()

if __name__ == "__main__":
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        print(pool.apply(work))
"""


def test_usage_counts_the_cpu_of_forkserver_children(tmp_path: Path) -> None:
    """A pool worker forked by the forkserver is not a child of the command, and the
    forkserver outlives it: rusage of the command alone leaves the worker out."""
    script = tmp_path / "work.py"
    script.write_text(FORKSERVER_WORK)
    report = tmp_path / "usage.json"
    wrapper = [sys.executable, "-m", "downloader.usage", "--report", str(report), "--"]
    proc = subprocess.run(
        [*wrapper, sys.executable, str(script)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    worker_cpu = float(proc.stdout.strip())
    tree = json.loads(report.read_text())
    assert tree["cpu_s"] >= worker_cpu > 0
    assert tree["procs"] >= 3  # the command, the forkserver and the worker, seen at once
    assert tree["tree_rss_mb"] > tree["main_rss_mb"] > 0


def test_usage_passes_the_exit_code_and_rejects_no_command(tmp_path: Path) -> None:
    report = tmp_path / "usage.json"
    wrapper = [sys.executable, "-m", "downloader.usage", "--report", str(report)]
    fails = subprocess.run([*wrapper, "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert fails.returncode == 3 and json.loads(report.read_text())["returncode"] == 3
    empty = subprocess.run([*wrapper, "--"], capture_output=True, text=True)
    assert empty.returncode == 2 and "no command" in empty.stderr


def test_compare_gil_scenario_runs_every_backend_and_holds_the_advice(tmp_path: Path) -> None:
    out_json = tmp_path / "gil.json"
    args = ["--scenario", "gil", "-n", "4", "--concurrency", "2", "--python-cpu-ms", "2"]
    result = CliRunner().invoke(main, ["compare", *args, "--json", str(out_json)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("classic advice: "))
    assert line.startswith("classic advice: processes for CPU-bound work that holds the GIL; ")
    assert "measured winner: " in line
    assert "CPU ms/img" in result.output and "pure-Python" in result.output
    data = json.loads(out_json.read_text())
    assert set(data["backends"]) == set(default_backends().split(","))
    assert data["python_cpu_ms"] == 2 and data["thumbnail_executor"] == "thread"
    assert data["advice"]["line"] == line and data["advice"]["advised"] == "processes"
    for numbers in data["backends"].values():
        assert numbers["cpu_ms_per_image"] > 0
        assert [run["ok"] for run in numbers["runs"]] == [4]
    # The pool backends' trees are measured: their workers count too.
    assert data["backends"]["hybrid"]["runs"][0]["processes"] >= 3


def test_advice_line_names_the_advised_backend_the_winner_and_sync() -> None:
    def row(name: str, wall: float) -> Row:
        return Row(name, [Run(name, 0, 100, 0, 1000, wall, 1.0, 50.0, 1.0, 2.0)])

    io = SCENARIOS["io"]
    rows = [row("sync", 37.0), row("asyncio", 1.02), row("hybrid", 1.0)]
    assert advice(rows, io) == (
        "classic advice: asyncio for slow I/O with many connections; measured winner: "
        "hybrid, 1.02x asyncio (a tie, within noise), 37x sync"
    )
    rows = [row("sync", 4.0), row("threads", 3.8), row("processes", 2.0)]
    assert advice(rows, SCENARIOS["gil"]).endswith(
        "measured winner: processes (as advised), 1.90x threads (next), 2.00x sync"
    )
    assert "asyncio not run" in advice([row("sync", 2.0), row("threads", 1.0)], io)


def _outcome(name: str) -> Outcome:
    rows = [
        Row(backend, [Run(backend, 0, 10, 0, 1000, wall, 1.0, 50.0, 1.0, 2.0)])
        for backend, wall in (("sync", 4.0), ("processes", 2.0))
    ]
    return Outcome(SCENARIOS[name], Settings(local=True), rows)


def test_all_scenarios_chart_side_by_side(tmp_path: Path) -> None:
    needs_matplotlib()
    one, three = tmp_path / "one.png", tmp_path / "three.png"
    write_chart([_outcome("gil")], one)
    write_chart([_outcome(name) for name in ("io", "cpu", "gil")], three)

    def png_width(path: Path) -> int:
        return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk

    assert png_width(three) >= 2.5 * png_width(one)


def test_all_scenarios_json_by_name(tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    write_json([_outcome(name) for name in ("io", "cpu", "gil")], out)
    data = json.loads(out.read_text())["scenarios"]
    assert list(data) == ["io", "cpu", "gil"]
    assert data["gil"]["advice"]["winner"] == "processes"
    assert data["io"]["closing_line"].startswith("classic advice: asyncio for slow I/O")


def test_compare_refuses_an_unwritable_json_path_before_running() -> None:
    result = invoke("compare", "-n", "1", "--json", "/dev/null/x.json")
    code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    assert code == 2 and "not a folder" in stderr and stdout == ""


def test_every_compare_option_is_declared_with_its_default() -> None:
    """compare's flags are made from CompareSettings' declarations, as download's are
    from the settings'."""
    help_text = " ".join(invoke("compare", "--help").stdout.split())
    for item in declarations(CompareSettings):
        assert item.meta.flag is not None and item.meta.commands == ("compare",), item.key
        assert item.meta.flag.split("/")[0] in help_text, item.key
    assert "-n, --count INTEGER Images per run. [default: scenario's, or 200]" in help_text
    assert "--repeat INTEGER Runs of each backend, 1 to 50; the median counts. [default: 1]" in (
        help_text
    )
    # Flags only: none of them is a config key (count is the download's own).
    assert not {"repeat", "scenario", "backends", "keep"} & set(known_keys())
    assert set(typing.get_args(ScenarioName)) == {*SCENARIOS, ALL}


def test_compare_flags_reach_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from downloader import compare as comparing

    plans: list[comparing.Plan] = []

    def record(plan: comparing.Plan, on_run: object = None) -> list[Outcome]:
        plans.append(plan)
        return []

    monkeypatch.setattr(comparing, "run_plan", record)
    args = ["--scenario", "gil", "-n", "5", "--no-local", "--size", "64x48", "--repeat", "3"]
    result = invoke("compare", *args, "--backends", "sync,threads", "--keep", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    (plan,) = plans
    (scenario, settings), *others = plan.workloads
    assert scenario is SCENARIOS["gil"] and not others
    assert (settings.count, settings.local, settings.width, settings.height) == (5, False, 64, 48)
    assert settings.thumbnails.python_cpu_ms == 20  # the scenario's: not given
    assert (plan.backends, plan.repeat, plan.keep) == (["sync", "threads"], 3, tmp_path)
    invoke("compare")
    assert plans[1].workloads[0][0] is None and plans[1].workloads[0][1].count == 200
    assert plans[1].repeat == 1 and plans[1].workloads[0][1].local


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--scenario", "nope"], "scenario must be one of io, cpu, gil, all, got 'nope'"),
        (["--repeat", "51"], "repeat must be between 1 and 50, got 51"),
        (["-n", "0"], "count must be at least 1, got 0"),
        (["--size", "3"], "expected WIDTHxHEIGHT like 640x480, got '3'"),
    ],
)
def test_bad_compare_flags_are_one_error_line(args: list[str], fragment: str) -> None:
    result = invoke("compare", *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert fragment in result.stderr and len(result.stderr.splitlines()) == 1


def test_compare_settings_validate_what_is_given() -> None:
    assert CompareSettings().count is None and CompareSettings(count=3).count == 3
    with pytest.raises(ConfigError, match="count must be an integer, got 'x'"):
        CompareSettings(count="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keep must be a path"):
        CompareSettings(keep="out")  # type: ignore[arg-type]
