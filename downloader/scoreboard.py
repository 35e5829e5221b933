"""compare's output: the side-by-side table, the classic advice beside the measured winner,
the JSON numbers and the chart."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from .compare import Outcome, Row, Run
from .errors import ConfigError
from .placement import placement
from .scenarios import Scenario
from .settings import Settings
from .timeline import to_json as to_timeline

COLUMNS = (
    "backend", "wall s", "images/s", "CPU ms/img", "MB/s", "p50 ms", "p95 ms", "CPU s",
    "cores", "RSS MB", "failed", "vs best",
)  # fmt: skip
FOOTNOTE = (
    "CPU: user + system of every process of the run (pool workers and forkserver children\n"
    "included, start-up included), per image saved. Cores: CPU s over the run's whole life\n"
    "(at most 1 where one GIL holds the work, however busy the machine). RSS MB: the peak of\n"
    "the sum over the run's process tree (a shared page counts in each process), sampled\n"
    "every 0.1 s."
)
TIE = 1.05  # closer than this is within the noise of one machine


def title(outcome: Outcome) -> str:
    settings, scenario = outcome.settings, outcome.scenario
    latency = f", {settings.server.latency_ms:g} ms latency" if settings.local else ""
    text = (
        f"{scenario.name if scenario else 'custom'}: {settings.count} images of "
        f"{settings.width}x{settings.height}{latency}, concurrency {settings.http.concurrency}, "
        f"thumbnails {settings.thumbnails.size or 'off'}"
    )
    if settings.thumbnails.python_cpu_ms:
        text += (
            f", + {settings.thumbnails.python_cpu_ms} ms of pure-Python CPU per image holding "
            f"the GIL (a stand-in for user code; threads and asyncio run it in "
            f"{placement(settings, 'asyncio').cpu} executors)"
        )
    return text


def render(outcome: Outcome) -> str:
    """The table, its footnote and the closing line (the advice, or the verdict)."""
    from rich.console import Console
    from rich.table import Table

    rows = outcome.rows
    fastest = min(row.wall_s for row in rows)
    table = Table(title=title(outcome))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "backend" else "right")
    for row in rows:
        table.add_row(
            row.backend,
            f"{row.wall_s:.2f}",
            f"{row.images_per_s:.1f}",
            f"{row.cpu_ms_per_image:.2f}",
            f"{row.mb_per_s:.2f}",
            f"{row.median('p50_ms'):.0f}",
            f"{row.median('p95_ms'):.0f}",
            f"{row.median('cpu_s'):.2f}",
            f"{row.cores:.2f}",
            f"{row.median('peak_rss_mb'):.0f}",
            str(sum(run.failed for run in row.runs)),
            f"{row.wall_s / fastest:.2f}x",
        )
    out = io.StringIO()
    Console(file=out, width=130, force_terminal=False).print(table)
    return f"{out.getvalue()}{FOOTNOTE}\n{closing_line(outcome)}"


def closing_line(outcome: Outcome) -> str:
    if outcome.scenario is None:
        return verdict(outcome.rows)
    return advice(outcome.rows, outcome.scenario)


def verdict(rows: list[Row]) -> str:
    ranked = sorted(rows, key=lambda row: row.wall_s)
    if len(ranked) < 2:
        return f"{ranked[0].backend}: {ranked[0].wall_s:.2f} s"
    best, second, worst = ranked[0], ranked[1], ranked[-1]
    text = f"{best.backend} won: {second.wall_s / best.wall_s:.2f}x faster than {second.backend}"
    if worst is not second:
        text += f", {worst.wall_s / best.wall_s:.2f}x faster than {worst.backend}"
    return text


def advice(rows: list[Row], scenario: Scenario) -> str:
    """ "classic advice: asyncio for slow I/O with many connections; measured winner:
    hybrid, 1.02x asyncio, 37x sync" (ratios of images/s)."""
    ranked = sorted(rows, key=lambda row: row.images_per_s, reverse=True)
    best = ranked[0]
    by_name = {row.backend: row for row in rows}
    advised = by_name.get(scenario.advised)
    parts = [f"measured winner: {best.backend}"]
    if advised is best:
        parts[0] += " (as advised)"
        if len(ranked) > 1:
            parts.append(_times(best, ranked[1]) + " (next)")
    elif advised is None:
        parts.append(f"{scenario.advised} not run")
    else:
        close = best.images_per_s < TIE * advised.images_per_s
        parts.append(_times(best, advised) + (" (a tie, within noise)" if close else ""))
    sync = by_name.get("sync")
    if sync is not None and sync is not best and sync is not advised:
        parts.append(_times(best, sync))
    return f"classic advice: {scenario.advised} for {scenario.advised_for}; " + ", ".join(parts)


def _times(best: Row, other: Row) -> str:
    if other.images_per_s <= 0:
        return f"inf x {other.backend}"
    ratio = best.images_per_s / other.images_per_s
    return f"{ratio:.2f}x {other.backend}" if ratio < 10 else f"{ratio:.0f}x {other.backend}"


# ---------------------------------------------------------------------------- files


def to_json(outcome: Outcome) -> dict[str, Any]:
    settings: Settings = outcome.settings
    return {
        "scenario": outcome.scenario.name if outcome.scenario else None,
        "count": settings.count,
        "size": f"{settings.width}x{settings.height}",
        "latency_ms": settings.server.latency_ms if settings.local else None,
        "concurrency": settings.http.concurrency,
        "thumbnail_size": settings.thumbnails.size,
        "thumbnail_executor": placement(settings, "asyncio").cpu,
        "python_cpu_ms": settings.thumbnails.python_cpu_ms,
        "closing_line": closing_line(outcome),
        "advice": _advice_json(outcome),
        "backends": {
            row.backend: {
                "wall_s_median": row.wall_s,
                "images_per_s": row.images_per_s,
                "cpu_ms_per_image": row.cpu_ms_per_image,
                "cores": row.cores,
                "mb_per_s": row.mb_per_s,
                "runs": [_run_json(run) for run in row.runs],
                **({"timeline": to_timeline(row.runs[0].spans)} if row.runs[0].spans else {}),
            }
            for row in outcome.rows
        },
    }


def _run_json(run: Run) -> dict[str, Any]:
    # Not asdict: it would deep-copy every span only to drop them.
    return {f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.name != "spans"}


def _advice_json(outcome: Outcome) -> dict[str, Any] | None:
    if outcome.scenario is None:
        return None
    best = max(outcome.rows, key=lambda row: row.images_per_s)
    return {
        "advised": outcome.scenario.advised,
        "for": outcome.scenario.advised_for,
        "winner": best.backend,
        "line": advice(outcome.rows, outcome.scenario),
    }


def write_json(outcomes: list[Outcome], path: Path) -> None:
    """One scenario: its numbers; several: ``{"scenarios": {name: numbers}}``."""
    if len(outcomes) == 1:
        data = to_json(outcomes[0])
    else:
        data = {"scenarios": {_name(o): to_json(o) for o in outcomes}}
    path.write_text(json.dumps(data, indent=2) + "\n")


def _name(outcome: Outcome) -> str:
    return outcome.scenario.name if outcome.scenario else "custom"


def check_chart_dependency() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--chart needs matplotlib: pip install 'downloader[chart]'") from None


def write_chart(outcomes: list[Outcome], path: Path) -> None:
    """images/s per backend, one panel per scenario side by side; the backend the classic
    advice picks is drawn in its own colour."""
    check_chart_dependency()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(outcomes), figsize=(4.6 * len(outcomes), 3.8), squeeze=False)
    for ax, outcome in zip(axes[0], outcomes, strict=True):
        advised = outcome.scenario.advised if outcome.scenario else None
        names = [row.backend for row in outcome.rows]
        values = [row.images_per_s for row in outcome.rows]
        colours = ["#dd8452" if name == advised else "#4c72b0" for name in names]
        ax.bar(names, values, color=colours)
        for i, value in enumerate(values):
            ax.annotate(f"{value:.0f}", (i, value), ha="center", va="bottom", fontsize=8)
        settings = outcome.settings
        ax.set_title(f"{_name(outcome)}: {settings.count} x {settings.width}x{settings.height}")
        ax.set_ylabel("images/s (median)")
        ax.tick_params(axis="x", labelrotation=30)
    if any(outcome.scenario for outcome in outcomes):
        patch = Patch(color="#dd8452", label="the backend the classic advice picks")
        fig.legend(handles=[patch], loc="lower center", frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_timeline(outcomes: list[Outcome], path: Path) -> None:
    """Each backend's first run as a timeline panel; one column per scenario."""
    from .timeline_chart import Panel, draw

    grid = [
        [
            Panel(
                f"{_name(outcome)}: {row.backend}" if len(outcomes) > 1 else row.backend,
                row.runs[0].spans,
                show_cpu_use=bool(outcome.settings.thumbnails.python_cpu_ms),
            )
            for row in outcome.rows
        ]
        for outcome in outcomes
    ]
    draw(grid, path, heading=title(outcomes[0]) if len(outcomes) == 1 else "")
