"""``download compare``'s workloads and options: the scenario presets, and the command's
flags declared with ``setting()`` like every other option (``CompareSettings``). Light to
import: the CLI builds the flags from these declarations when it starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .choices import ScenarioName
from .declare import Checked, setting


@dataclass(frozen=True)
class Scenario:
    """A preset for the classic question, and the classic answer to hold it against."""

    name: str
    count: int
    latency_ms: float
    size: tuple[int, int]
    concurrency: int
    advised: str  # the backend the classic advice picks
    advised_for: str  # the advice's own words
    python_cpu_ms: int = 0
    executor: str | None = None  # thumbnails.executor; None = the configured one


SCENARIOS: dict[str, Scenario] = {  # with ALL, the names in choices.ScenarioName
    # Slow network, small images, many connections.
    "io": Scenario("io", 200, 200.0, (320, 240), 100, "asyncio", "slow I/O with many connections"),
    # No latency, large images, so the thumbnail stage (Pillow, which releases the GIL) dominates.
    "cpu": Scenario("cpu", 400, 0.0, (1920, 1080), 8, "processes", "CPU-bound work"),
    # Pure-Python work per image that holds the GIL, run where threads and asyncio run the
    # thumbnail: in a thread (the worker thread, or asyncio's executor).
    "gil": Scenario(
        "gil",
        200,
        0.0,
        (320, 240),
        8,
        "processes",
        "CPU-bound work that holds the GIL",
        python_cpu_ms=20,
        executor="thread",
    ),
}
ALL = "all"


_COMPARE = ("compare",)


@dataclass(frozen=True)
class CompareSettings(Checked):
    """``download compare``'s options. Flags only: no config key, no environment variable
    (the workload's own settings come from those, as for a download). None: not given, so
    the scenario's value or the configured one counts."""

    count: int | None = setting(
        None, "Images per run.", flag="--count", short="-n",
        default_text="scenario's, or 200", commands=_COMPARE,
    )  # fmt: skip
    backends: str = setting(
        "",
        "Comma-separated backends to compare.",
        flag="--backends",
        default_text="sync,threads,asyncio,processes,hybrid, and dask when distributed is "
        "installed",
        commands=_COMPARE,
    )
    scenario: ScenarioName | None = setting(
        None,
        "io: 200 ms latency, 320x240, 100 connections. cpu: no latency, 1920x1080, "
        "8 connections, so thumbnails dominate. gil: no latency, 320x240, 8 connections, and "
        "--python-cpu-ms of pure-Python work per image that holds the GIL (run in a thread "
        "by threads and asyncio). all: the three, one after another. Flags given as well win.",
        flag="--scenario",
        metavar="[io|cpu|gil|all]",
        commands=_COMPARE,
    )
    local: bool = setting(
        True, "Use the built-in server. [default: local]", flag="--local/--no-local",
        commands=_COMPARE,
    )  # fmt: skip
    latency_ms: float | None = setting(
        None, "Simulated latency per image (built-in server).", flag="--latency-ms",
        commands=_COMPARE,
    )  # fmt: skip
    size: str | None = setting(
        None, "Image size.", flag="--size", metavar="WxH", commands=_COMPARE
    )  # WIDTHxHEIGHT, read as download's --size is
    concurrency: int | None = setting(
        None, "Downloads in flight for every backend.", flag="--concurrency", commands=_COMPARE
    )
    thumbnail_size: int | None = setting(
        None, "Thumbnail size; 0 = off.", flag="--thumbnail-size", metavar="PX",
        commands=_COMPARE,
    )  # fmt: skip
    python_cpu_ms: int | None = setting(
        None,
        "Pure-Python CPU work per image that holds the GIL, a stand-in for your own code "
        "(thumbnails.python_cpu_ms).",
        flag="--python-cpu-ms",
        metavar="MS",
        default_text="20 with --scenario gil, else 0",
        commands=_COMPARE,
    )
    repeat: int = setting(
        1, "Runs of each backend, 1 to 50; the median counts.", flag="--repeat", low=1, high=50,
        commands=_COMPARE,
    )  # fmt: skip
    json: Path | None = setting(None, "Write raw numbers.", flag="--json", commands=_COMPARE)
    chart: Path | None = setting(
        None, "Write a PNG bar chart (with --scenario all: the three side by side).",
        flag="--chart", commands=_COMPARE,
    )  # fmt: skip
    keep: Path | None = setting(
        None, "Keep each run's output here.", flag="--keep", commands=_COMPARE
    )
    timeline: Path | None = setting(
        None,
        "Record every image's wait, cpu and write spans and draw them, one panel per backend "
        "(.png or .svg); --json then carries them too.",
        flag="--timeline",
        metavar="FILE",
        commands=_COMPARE,
    )

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The files to be written once the runs are done."""
        return tuple(path for path in (self.json, self.chart, self.timeline) if path is not None)
