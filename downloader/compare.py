"""compare: run several backends on one workload and report side by side.

Each run is a fresh child process (so CPU seconds and peak RSS are its own) with a fresh
output folder, against one built-in server in another process (so the server never shares
a GIL with the run it serves). Runs are interleaved across repeats (A B C, A B C, ...) so
drift on a noisy machine spreads over every backend instead of punishing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .photos import clean_keywords
from .settings import Settings, build, coerce, flatten

# Presets for the classic question. io: slow network, small images, many connections.
# cpu: no latency, large images, so the thumbnail stage dominates.
SCENARIOS: dict[str, dict[str, Any]] = {
    "io": {"count": 200, "latency_ms": 200.0, "size": (320, 240), "concurrency": 100},
    "cpu": {"count": 400, "latency_ms": 0.0, "size": (1920, 1080), "concurrency": 8},
}


@dataclass
class Run:
    backend: str
    repeat: int
    ok: int
    failed: int
    bytes: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    p50_ms: float
    p95_ms: float


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


# ---------------------------------------------------------------------------- child side


def settings_to_json(settings: Settings) -> str:
    return json.dumps(dataclasses.asdict(settings), default=str)


def settings_from_json(text: str) -> Settings:
    flat = flatten(json.loads(text), "compare")
    return build({key: coerce(key, value, "compare") for key, value in flat.items()})


def child_main() -> None:
    """``python -m downloader.compare``: read Settings as JSON on stdin, run, print Report."""
    from .backends.pools import reap_forkserver
    from .pipeline import run

    report = run(settings_from_json(sys.stdin.read()), keep_results=False)
    reap_forkserver()
    # The whole process tree, start-up included: workers' start-up is part of a backend's
    # cost (the processes backend pays it once per worker).
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    report.cpu_s = sum(u.ru_utime + u.ru_stime for u in usage)
    report.peak_rss_mb = max(u.ru_maxrss for u in usage) / 1024
    print(
        json.dumps(
            {
                "ok": report.ok,
                "failed": report.failed,
                "bytes": report.bytes,
                "wall_s": report.wall_s,
                "cpu_s": report.cpu_s,
                "peak_rss_mb": report.peak_rss_mb,
                "p50_ms": report.percentile(50),
                "p95_ms": report.percentile(95),
            }
        )
    )


# ---------------------------------------------------------------------------- parent side


def run_one(settings: Settings, repeat: int) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "downloader.compare"],
        input=settings_to_json(settings),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{settings.backend} run failed: {last}")
    return Run(settings.backend, repeat, **json.loads(proc.stdout.strip().splitlines()[-1]))


def warm_server(base_url: str, settings: Settings) -> None:
    """Render every photo of the pool once, so the first backend measured does not pay
    for the server's cache."""
    keywords = clean_keywords(settings.keywords)
    query = "?" + urllib.parse.urlencode({"keywords": keywords}) if keywords else ""
    tone = "g" if settings.gray else "c"
    for photo in range(settings.server.pool_size):
        name = f"{photo}_{tone}_{settings.width}_{settings.height}_nofilter.jpg{query}"
        with urllib.request.urlopen(f"{base_url}/cache/resized/{name}", timeout=60) as resp:
            resp.read()


def compare(
    settings: Settings, backends: list[str], repeat: int, out_root: Path | None = None
) -> list[Row]:
    """Run each backend ``repeat`` times on ``settings``' workload; rows in input order."""
    from .pipeline import template_for

    rows = {name: Row(name) for name in backends}
    with _out_root(out_root) as root, _local_server(settings) as base_url:
        if base_url is not None:
            warm_server(base_url, settings)
        url = template_for(settings, base_url).text
        for r in range(repeat):
            for name in backends:
                out = root / f"{name}-{r}"
                run_settings = settings.replace(
                    backend=name, out=out, local=False, progress=False, url=url
                )
                rows[name].runs.append(run_one(run_settings, r))
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
def _out_root(out_root: Path | None) -> Iterator[Path]:
    if out_root is not None:
        out_root.mkdir(parents=True, exist_ok=True)
        yield out_root
        return
    with tempfile.TemporaryDirectory(prefix="downloader-compare-") as name:
        yield Path(name)


# ---------------------------------------------------------------------------- output


def rows_to_json(rows: list[Row], settings: Settings, scenario: str | None) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "count": settings.count,
        "size": f"{settings.width}x{settings.height}",
        "latency_ms": settings.server.latency_ms if settings.local else None,
        "concurrency": settings.http.concurrency,
        "thumbnail_size": settings.thumbnails.size,
        "backends": {
            row.backend: {
                "wall_s_median": row.wall_s,
                "images_per_s": row.images_per_s,
                "mb_per_s": row.mb_per_s,
                "runs": [dataclasses.asdict(run) for run in row.runs],
            }
            for row in rows
        },
    }


def print_table(rows: list[Row], settings: Settings, scenario: str | None) -> None:
    """The side-by-side table, on stdout."""
    from rich.console import Console
    from rich.table import Table

    fastest = min(row.wall_s for row in rows)
    latency = f", {settings.server.latency_ms:g} ms latency" if settings.local else ""
    table = Table(
        title=f"{scenario or 'custom'}: {settings.count} images of {settings.width}x"
        f"{settings.height}{latency}, concurrency {settings.http.concurrency}, "
        f"thumbnails {settings.thumbnails.size or 'off'}",
    )
    for column in (
        "backend", "wall s", "images/s", "MB/s", "p50 ms", "p95 ms",
        "CPU s", "peak RSS MB", "failed", "vs fastest",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "backend" else "right")
    for row in rows:
        table.add_row(
            row.backend,
            f"{row.wall_s:.2f}",
            f"{row.images_per_s:.1f}",
            f"{row.mb_per_s:.2f}",
            f"{row.median('p50_ms'):.0f}",
            f"{row.median('p95_ms'):.0f}",
            f"{row.median('cpu_s'):.2f}",
            f"{row.median('peak_rss_mb'):.0f}",
            str(sum(run.failed for run in row.runs)),
            f"{row.wall_s / fastest:.2f}x",
        )
    Console(width=120).print(table)


def verdict(rows: list[Row]) -> str:
    ranked = sorted(rows, key=lambda row: row.wall_s)
    if len(ranked) < 2:
        return f"{ranked[0].backend}: {ranked[0].wall_s:.2f} s"
    best, second, worst = ranked[0], ranked[1], ranked[-1]
    text = f"{best.backend} won: {second.wall_s / best.wall_s:.2f}x faster than {second.backend}"
    if worst is not second:
        text += f", {worst.wall_s / best.wall_s:.2f}x faster than {worst.backend}"
    return text


def write_chart(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--chart needs matplotlib: pip install 'downloader[chart]'") from None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [row.backend for row in rows]
    ax.bar(names, [row.images_per_s for row in rows], color="#4c72b0")
    ax.set_ylabel("images/s (median)")
    ax.set_title(title)
    for i, row in enumerate(rows):
        ax.annotate(f"{row.images_per_s:.0f}", (i, row.images_per_s), ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    child_main()
