"""A per-image stage of pure-Python CPU work that holds the GIL: a stand-in for user code
(a custom filter, a parser, a scoring function) run beside the thumbnail.

Pillow releases the GIL, so the thumbnail stage alone cannot show why threads do not speed
up CPU-bound Python. This stage can: it is a fixed number of bytecode-level arithmetic
steps, never a wall-clock spin, so two threads sharing one GIL take twice as long while two
processes take no longer. ``thumbnails.python_cpu_ms`` sets its cost in milliseconds of CPU,
turned into a step count by a calibration each process runs once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_PROBE_STEPS = 20_000
_PROBES = 5


def spin(steps: int, seed: int = 1) -> int:
    """``steps`` rounds of integer arithmetic in the interpreter; the GIL is held throughout
    (apart from the interpreter's own switch interval)."""
    x = seed
    for i in range(steps):
        x = (x * 1103515245 + i) % 2147483648
    return x


@functools.cache
def steps_per_ms() -> float:
    """How many ``spin`` steps this process runs per millisecond of its own CPU time.

    Timed on the thread's CPU clock, so neither waiting for the GIL nor other processes on
    the machine count; the fastest of a few probes, so a preemption mid-probe does not."""
    best = float("inf")
    for _ in range(_PROBES):
        start = time.thread_time_ns()
        spin(_PROBE_STEPS)
        best = min(best, time.thread_time_ns() - start)
    return _PROBE_STEPS / max(best / 1e6, 1e-6)


def steps_for(cpu_ms: int) -> int:
    return round(cpu_ms * steps_per_ms())


def burn(cpu_ms: int, seed: int = 1) -> int:
    """About ``cpu_ms`` milliseconds of CPU (as calibrated), holding the GIL."""
    return spin(steps_for(cpu_ms), seed) if cpu_ms > 0 else seed


def after(stage: Callable[[bytes], T], cpu_ms: int, data: bytes) -> T:
    """Run ``stage`` on ``data``, then ``cpu_ms`` of Python work: bind it with
    ``functools.partial(after, stage, cpu_ms)``, which a process pool can pickle."""
    result = stage(data)
    burn(cpu_ms, seed=len(data))
    return result
