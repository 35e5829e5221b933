"""peers.py's verdicts: issue 21's targets for the best of asyncio and hybrid, and what
``NO_PROXY`` costs each of our variants, from the rows of one invocation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from _harness import median


class Row(Protocol):  # peers.Row, as far as the verdicts read it
    env: str
    runs: list[Any]

    @property
    def variant(self) -> Any: ...
    @property
    def images_per_s(self) -> float: ...
    @property
    def cpu_ms_per_image(self) -> float: ...
    def med(self, name: str) -> float: ...


# Issue 21's targets, for the best of asyncio and hybrid: (variant suffix, the peer, CPU ms
# an image at most, the peer's images/s times at least); with latency, the wall time over
# the ideal at most and curl's images/s times at least, for --verify header.
TARGETS = (("", "img2dataset", 2.0, 4.0), ("-dl-header", "curl", 0.6, 0.5))
LATENCY_TARGET = (1.5, 1.0)


def targets(
    rows: Sequence[Row], envs: Sequence[str], latency_ms: float, ideal_s: float
) -> list[str]:
    """One line a target and environment: met or MISSED."""
    lines = ["issue 21's targets, the best of asyncio and hybrid (by CPU ms/image):"]
    for env in envs:
        for suffix, peer, max_ms, min_x in TARGETS:
            best = _best([r for r in rows if r.env == env], suffix)
            if best is None:
                continue
            ref = _named(rows, peer, env)
            x = best.images_per_s / ref.images_per_s if ref and ref.images_per_s else None
            text = f"  {env:<9} {best.variant.name:<18} {best.cpu_ms_per_image:.2f} ms/image "
            text += f"(<= {max_ms:g}: {_verdict(best.cpu_ms_per_image <= max_ms)})"
            if x is not None:
                text += f", {x:.2f}x {peer}'s images/s (>= {min_x:g}: {_verdict(x >= min_x)})"
            if latency_ms > 0 and suffix == "-dl-header":
                over = best.med("wall_s") / ideal_s
                max_over, min_curl = LATENCY_TARGET
                text += f"; wall {over:.2f}x the ideal (<= {max_over:g}: "
                text += f"{_verdict(over <= max_over)})"
                if x is not None:
                    text += f", {x:.2f}x curl (>= {min_curl:g}: {_verdict(x >= min_curl)})"
            lines.append(text)
    return lines if len(lines) > 1 else []


def proxy_costs(rows: Sequence[Row], envs: Sequence[str], ours: Sequence[str]) -> list[str]:
    """Each of our variants' CPU with NO_PROXY over its CPU in the clean environment, run
    pair by run pair (the same repeat), then the median. Target: at most 1.10x."""
    if not {"clean", "no-proxy"} <= set(envs):
        return []
    lines = ["what NO_PROXY costs: CPU s with it / without, median of the repeats' pairs "
             "(target <= 1.10x):"]  # fmt: skip
    for row in rows:
        clean = _named(rows, row.variant.name, "clean")
        if row.env != "no-proxy" or row.variant.tool not in ours or clean is None:
            continue
        pairs = zip(row.runs, clean.runs, strict=False)
        x = median([a.cpu_s / b.cpu_s for a, b in pairs if b.cpu_s > 0])
        lines.append(f"  {row.variant.name:<18} {x:.2f}x ({_verdict(x <= 1.10)})")
    return lines


def _best(rows: Sequence[Row], suffix: str) -> Row | None:
    mine = [r for r in rows if r.variant.name in (f"asyncio{suffix}", f"hybrid{suffix}")]
    return min(mine, key=lambda r: r.cpu_ms_per_image, default=None)


def _named(rows: Sequence[Row], name: str, env: str) -> Row | None:
    return next((r for r in rows if r.variant.name == name and r.env == env), None)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"
