#!/usr/bin/env python3
"""Summarise a py-spy raw (collapsed-stack) profile: the top functions by self and by
inclusive samples, per process (the main ``download`` process, and the thumbnail workers
together), as percentages of that process's samples.

    py-spy record -f raw -o /tmp/profile.txt --subprocesses -- download --backend asyncio ...
    python benchmarks/profile_top.py /tmp/profile.txt [--top 25] [--package]

Not a test; not run by CI.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_PROCESS = re.compile(r'process \d+:"[^"]*";')
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def parse(path: Path, by_thread: bool = False) -> dict[str, list[tuple[list[str], int]]]:
    """role ("main", or "main thread (0x..)" with ``by_thread`` and a profile recorded with
    --threads, or "workers": every child process) -> [(frames root first, samples)]."""
    out: dict[str, list[tuple[list[str], int]]] = {"main": [], "workers": []}
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        # Process tags come first and their command lines may hold ';' themselves.
        procs = _PROCESS.findall(stack)
        rest = _PROCESS.sub("", stack)
        parts = [p for p in rest.split(";") if p]
        thread = next((p for p in parts if p.startswith("thread ")), None)
        frames = [p for p in parts if not p.startswith("thread ")]
        role = "main" if len(procs) <= 1 else "workers"
        if role == "main" and thread is not None and by_thread:
            role = f"main {thread}"
        out.setdefault(role, []).append((frames, int(count)))
    return out


def where(frame: str, package: bool) -> str:
    """``func (file:line)`` -> ``func (file)``, or with ``package`` the top-level package."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    if package:
        top = file.split("/")[0]
        return top.removesuffix(".py") if "/" in file else f"stdlib:{top.removesuffix('.py')}"
    return f"{match['func']} ({file})"


def report(stacks: list[tuple[list[str], int]], top: int, package: bool) -> str:
    total = sum(n for _, n in stacks)
    if not total:
        return "  (no samples)"
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        keys = [where(f, package) for f in frames]
        if keys:
            own[keys[-1]] += n
        for key in set(keys):
            inclusive[key] += n
    lines = [f"  {total} samples"]
    lines.append(f"  {'self %':>7}  function (leaf frame)")
    for key, n in own.most_common(top):
        lines.append(f"  {100 * n / total:7.1f}  {key}")
    lines.append(f"  {'incl %':>7}  function (anywhere on the stack)")
    for key, n in inclusive.most_common(top):
        lines.append(f"  {100 * n / total:7.1f}  {key}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--package", action="store_true", help="group by top-level package")
    p.add_argument("--threads", action="store_true", help="main process: one section a thread")
    args = p.parse_args(argv)
    for role, stacks in parse(args.profile, args.threads).items():
        print(f"== {role}")
        print(report(stacks, args.top, args.package))
    return 0


if __name__ == "__main__":
    sys.exit(main())
