"""compare: run several backends on one workload and measure them side by side.

Each run is a fresh child process with a fresh output folder, measured as a whole process
tree by ``downloader.usage`` (CPU of every process it starts, pool workers and forkserver
children included; peak of the tree's summed RSS), against one built-in server in another
process (so the server never shares a GIL, or a CPU count, with the run it serves). Runs
are interleaved across repeats (A B C, A B C, ...) so drift on a noisy machine spreads over
every backend instead of punishing one. The output (table, advice, JSON, chart) is
``scoreboard``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE
from typing import Any

from .backends import BACKENDS
from .config import build, coerce, flatten, load_settings
from .errors import ConfigError
from .jobs import template_for
from .scenarios import ALL, SCENARIOS, CompareSettings, Scenario
from .settings import Settings
from .timeline import Span


@dataclass
class Run:
    backend: str
    repeat: int
    ok: int
    failed: int
    bytes: int
    wall_s: float  # the pipeline's own wall time (interpreter start-up excluded)
    cpu_s: float  # every process of the run, start-up included
    peak_rss_mb: float  # peak of the summed RSS of the run's process tree
    p50_ms: float
    p95_ms: float
    processes: int = 1  # most processes seen at once in the run's tree
    process_wall_s: float = 0.0  # from the run's spawn to its exit, start-up included
    spans: list[Span] = field(default_factory=list, repr=False)  # --timeline only


@dataclass
class Row:
    backend: str
    runs: list[Run] = field(default_factory=list)

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(run, name) for run in self.runs))

    @property
    def wall_s(self) -> float:
        return self.median("wall_s")

    @property
    def images_per_s(self) -> float:
        return self.median("ok") / self.wall_s if self.wall_s else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.median("bytes") / 1e6 / self.wall_s if self.wall_s else 0.0

    @property
    def cores(self) -> float:
        """CPU seconds per second of the run's life: at most 1 for work that holds one GIL,
        however loaded the machine is; more only where processes run at once."""
        per_run = [run.cpu_s / run.process_wall_s for run in self.runs if run.process_wall_s]
        return float(statistics.median(per_run)) if per_run else 0.0

    @property
    def cpu_ms_per_image(self) -> float:
        per_run = [run.cpu_s * 1000 / run.ok if run.ok else float("inf") for run in self.runs]
        return float(statistics.median(per_run))


@dataclass(frozen=True)
class Request:
    """What ``download compare`` was asked: its options, ``--size`` and the config file."""

    options: CompareSettings = field(default_factory=CompareSettings)
    size: tuple[int, int] | None = None
    config: Path | None = None


@dataclass
class Outcome:
    scenario: Scenario | None
    settings: Settings
    rows: list[Row]

    @property
    def failed(self) -> int:
        return sum(run.failed for row in self.rows for run in row.runs)


@dataclass(frozen=True)
class Plan:
    workloads: list[tuple[Scenario | None, Settings]]
    backends: list[str]
    repeat: int
    keep: Path | None


# ---------------------------------------------------------------------------- planning


def plan(request: Request) -> Plan:
    """Check every option before anything runs; one Settings per scenario."""
    options = request.options
    if options.scenario == ALL:
        scenarios: list[Scenario | None] = list(SCENARIOS.values())
    else:
        scenarios = [SCENARIOS[options.scenario] if options.scenario else None]
    workloads = [(scenario, _settings(request, scenario)) for scenario in scenarios]
    backends = [name.strip() for name in (options.backends or default_backends()).split(",")]
    backends = [name for name in backends if name]
    for name in backends:
        if name not in BACKENDS:
            raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    for path in options.outputs:
        if not path.parent.is_dir():
            raise ConfigError(f"cannot write {path}: {path.parent} is not a folder")
    if options.keep is not None:
        from .storage import check_writable

        check_writable(options.keep)
    return Plan(workloads, backends, options.repeat, options.keep)


def _settings(request: Request, scenario: Scenario | None) -> Settings:
    given = request.options
    size = request.size or (scenario.size if scenario else None)
    overrides: dict[str, Any] = {
        "count": _first(given.count, scenario.count if scenario else 200),
        "local": given.local,
        "server.latency_ms": _first(given.latency_ms, scenario.latency_ms if scenario else None),
        "http.concurrency": _first(given.concurrency, scenario.concurrency if scenario else None),
        "thumbnails.size": given.thumbnail_size,
        "thumbnails.python_cpu_ms": _first(
            given.python_cpu_ms, scenario.python_cpu_ms if scenario else None
        ),
        "thumbnails.executor": scenario.executor if scenario else None,
        "progress": False,
        "timeline": given.timeline is not None,
    }
    if size is not None:
        overrides["width"], overrides["height"] = size
    return load_settings(request.config, overrides=overrides)


def default_backends() -> str:
    """Every registered backend; dask only when ``distributed`` is installed."""
    has_dask = importlib.util.find_spec("distributed") is not None
    return ",".join(name for name in BACKENDS if name != "dask" or has_dask)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


# ---------------------------------------------------------------------------- child side


def settings_to_json(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings), default=str)


def settings_from_json(text: str) -> Settings:
    flat = flatten(json.loads(text), "compare")
    return build({key: coerce(key, value, "compare") for key, value in flat.items()})


def child_main() -> None:
    """``python -m downloader.compare``: read Settings as JSON on stdin, run, print Report."""
    from .children import reap_forkserver
    from .pipeline import run

    report = run(settings_from_json(sys.stdin.read()), keep_results=False)
    reap_forkserver()  # its workers' CPU then reaches the measuring process at once
    numbers = {
        "ok": report.ok,
        "failed": report.failed,
        "bytes": report.bytes,
        "wall_s": report.wall_s,
        "p50_ms": report.percentile(50),
        "p95_ms": report.percentile(95),
        "spans": [span.to_json() for span in report.spans],
    }
    print(json.dumps(numbers))


# ---------------------------------------------------------------------------- parent side

OnRun = Callable[[Scenario | None, Run], None]


def run_one(settings: Settings, repeat: int, scratch: Path) -> Run:
    """One run in a fresh process, measured as a tree by ``python -m downloader.usage``."""
    usage = scratch / f"usage-{settings.backend}-{repeat}.json"
    usage.unlink(missing_ok=True)
    wrapper = [sys.executable, "-m", "downloader.usage", "--report", str(usage), "--"]
    cmd = [*wrapper, sys.executable, "-m", "downloader.compare"]
    with subprocess.Popen(cmd, stdin=PIPE, stdout=PIPE, stderr=PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(settings_to_json(settings))
        except KeyboardInterrupt:
            _stop_in_order(proc)
            raise
    if proc.returncode != 0 or not usage.exists():
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{settings.backend} run failed: {last}")
    tree = json.loads(usage.read_text())
    numbers = json.loads(stdout.strip().splitlines()[-1])
    numbers["spans"] = [Span.from_json(span) for span in numbers.get("spans", ())]
    return Run(
        settings.backend,
        repeat,
        cpu_s=tree["cpu_s"],
        peak_rss_mb=tree["tree_rss_mb"],
        processes=tree["procs"],
        process_wall_s=tree["wall_s"],
        **numbers,
    )


def _stop_in_order(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C: the terminal sent it to the measuring wrapper too, which passes it on to the
    run (in a session of its own); the run stops in order and the wrapper reaps it. Sending
    another would be a second Ctrl-C, which stops a run at once."""
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def warm_server(base_url: str, settings: Settings) -> None:
    """Render every photo of the pool once, so the first backend measured does not pay
    for the server's cache."""
    for photo in range(settings.server.pool_size):
        name = f"{photo}_c_{settings.width}_{settings.height}_nofilter.jpg"
        with urllib.request.urlopen(f"{base_url}/cache/resized/{name}", timeout=60) as resp:
            resp.read()


def run_plan(plan: Plan, on_run: OnRun | None = None) -> list[Outcome]:
    """Every workload of ``plan``, one after another."""
    outcomes = []
    for scenario, settings in plan.workloads:
        keep = plan.keep
        if keep is not None and len(plan.workloads) > 1 and scenario is not None:
            keep = keep / scenario.name

        def tell(run: Run, scenario: Scenario | None = scenario) -> None:
            if on_run is not None:
                on_run(scenario, run)

        rows = compare(settings, plan.backends, plan.repeat, keep, tell)
        outcomes.append(Outcome(scenario, settings, rows))
    return outcomes


def compare(
    settings: Settings,
    backends: list[str],
    repeat: int,
    out_root: Path | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> list[Row]:
    """Run each backend ``repeat`` times on ``settings``' workload; rows in input order."""
    rows = {name: Row(name) for name in backends}
    with (
        tempfile.TemporaryDirectory(prefix="downloader-compare-") as scratch,
        _out_root(out_root, Path(scratch)) as root,
        _local_server(settings) as base_url,
    ):
        if base_url is not None:
            warm_server(base_url, settings)
        url = template_for(settings, base_url).text
        for r in range(repeat):
            for name in backends:
                out = root / f"{name}-{r}"
                run_settings = settings.replace(
                    backend=name, out=out, local=False, progress=False, url=url
                )
                run = run_one(run_settings, r, Path(scratch))
                rows[name].runs.append(run)
                if on_run is not None:
                    on_run(run)
    return list(rows.values())


@contextlib.contextmanager
def _local_server(settings: Settings) -> Iterator[str | None]:
    if not settings.local:
        yield None
        return
    from .server import server_process

    with server_process(settings.server.replace_port(0)) as server:
        yield server.base_url


@contextlib.contextmanager
def _out_root(out_root: Path | None, scratch: Path) -> Iterator[Path]:
    if out_root is not None:
        out_root.mkdir(parents=True, exist_ok=True)
        yield out_root
        return
    (scratch / "runs").mkdir()
    yield scratch / "runs"


if __name__ == "__main__":
    child_main()
