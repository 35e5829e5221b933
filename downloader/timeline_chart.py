"""The timeline picture: one panel per run, time on x, one lane per thread grouped by
process on y, each image's wait, cpu and write spans in three colours. A thread that has
several spans in progress at once (an event loop's tasks) gets as many rows as it needs,
so overlap shows as height, never as bars drawn over each other."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .timeline import PHASES, Span, cpu_use, lanes, most_at_once

COLOURS = {"wait": "#4c72b0", "cpu": "#dd8452", "write": "#55a868"}
LABELS = {"wait": "wait (request sent .. body in)", "cpu": "cpu (check, thumbnail, Python)",
          "write": "write (files)"}  # fmt: skip
SUFFIXES = (".png", ".svg")
MAX_LABELS = 6  # process groups labelled by pid; more would overlap


@dataclass(frozen=True)
class Panel:
    """One run to draw: its name (a backend), its spans, and whether to say how much of
    the CPU spans' time really computed (the gil scenario)."""

    name: str
    spans: Sequence[Span]
    show_cpu_use: bool = False


def check_timeline_file(path: Path) -> None:
    """A one-line error for a file the timeline cannot be drawn to, before any run."""
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--timeline draws a .png or .svg file, not {path.name!r}")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: {path.parent} is not a folder")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--timeline needs matplotlib: pip install 'downloader[chart]'") from None


def title(panel: Panel) -> str:
    spans = panel.spans
    if not spans:
        return f"{panel.name}: no spans recorded"
    images = len({span.index for span in spans})
    end = max(span.end for span in spans)
    text = (
        f"{panel.name}: {images} images in {end:.2f} s; at once: up to "
        f"{most_at_once(spans, 'wait')} waits, {most_at_once(spans, 'cpu')} CPU spans"
    )
    use = cpu_use(spans) if panel.show_cpu_use else None
    if use is not None:
        text += f"\nCPU spans really computed {use.share:.0%} of their time ({use.cores:.2f} cores)"
    return text


def draw(grid: Sequence[Sequence[Panel]], path: Path, heading: str = "") -> None:
    """``grid``: columns of panels (one column per scenario), drawn one above another."""
    check_timeline_file(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = max(len(column) for column in grid)
    fig, axes = plt.subplots(
        rows, len(grid), figsize=(7.5 * len(grid), 2.3 * rows + 0.9), squeeze=False
    )
    for c, column in enumerate(grid):
        for r in range(rows):
            ax = axes[r][c]
            if r < len(column):
                _panel(ax, column[r])
            else:
                ax.set_visible(False)
        axes[len(column) - 1][c].set_xlabel("seconds since the run began")
    handles = [Patch(color=COLOURS[phase], label=LABELS[phase]) for phase in PHASES]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    heading = textwrap.fill(heading, 100 * len(grid))
    if heading:
        fig.suptitle(heading, fontsize=9)
    height = 2.3 * rows + 0.9  # inches
    lines = heading.count("\n") + 1 if heading else 0
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1 - 0.2 * lines / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax: Any, panel: Panel) -> None:
    ax.set_title(title(panel), fontsize=9, loc="left")
    rows, ticks = _rows(panel.spans)
    total = max(rows.values(), default=0) + 1
    for phase in PHASES:
        mine = [s for s in panel.spans if s.phase == phase]
        if mine:
            ax.barh(
                [rows[id(s)] for s in mine],
                [max(s.end - s.start, 1e-4) for s in mine],
                left=[s.start for s in mine],
                height=0.8,
                color=COLOURS[phase],
                linewidth=0,
            )
    for y, label, first in ticks:
        if first > 0:
            ax.axhline(first - 0.5, color="#999999", linewidth=0.6)
        if len(ticks) <= MAX_LABELS:
            ax.annotate(label, (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", fontsize=7, va="center")  # fmt: skip
    ax.set_ylim(total - 0.5, -0.5)
    ax.set_yticks([])
    threads = sum(len(t) for t in lanes(panel.spans).values())
    ax.set_ylabel(f"{_many(len(ticks), 'process')},\n{_many(threads, 'thread')}", fontsize=8)
    ax.set_xlim(left=0)
    ax.tick_params(axis="x", labelsize=8)


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('s') else 's'}"


def _rows(spans: Sequence[Span]) -> tuple[dict[int, int], list[Any]]:
    """Each span's row, and a label per process group: (middle row, text, first row)."""
    placed: dict[int, int] = {}
    ticks = []
    next_row = 0
    by_thread: dict[tuple[int, int], list[Span]] = {}
    for span in spans:
        by_thread.setdefault((span.process, span.thread), []).append(span)
    for process, threads in lanes(spans).items():
        first = next_row
        for thread in threads:
            ends: list[float] = []  # the last end of each of this thread's rows
            for span in sorted(by_thread[(process, thread)], key=lambda s: s.start):
                row = next((i for i, end in enumerate(ends) if end <= span.start), len(ends))
                if row == len(ends):
                    ends.append(span.end)
                ends[row] = span.end
                placed[id(span)] = next_row + row
            next_row += len(ends)
        count = len(threads)
        label = f"pid {process}\n{count} thread{'s' if count > 1 else ''}"
        ticks.append(((first + next_row - 1) / 2, label, first))
    return placed, ticks
