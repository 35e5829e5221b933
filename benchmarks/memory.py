#!/usr/bin/env python3
"""Does the downloader's memory grow with the number of images? (It should not: jobs are
pulled lazily through a bounded queue and results are streamed to the manifest.)

    python benchmarks/memory.py [--counts 1000,20000] [--backend asyncio] [--size 320x240]
        [--concurrency 64] [--thumbnail-size 0] [--local] [--repeat 1] [--json FILE]
        [--extra '--output-format webdataset --samples-per-shard 10000']

Runs ``download --backend B -n N`` once per count (and per repeat) as a whole process
against one ``download serve`` started here (or with ``--local``, the downloader's own
built-in server), and reports the peak RSS of the *main* process for each count and their
ratio. The thumbnail workers are forkserver children, not part of the main process; their
and the whole tree's peaks are shown beside it for context.

Main peak RSS is measured two ways: ``ru_maxrss`` from ``os.wait4`` on the process (what
``/usr/bin/time -v`` prints as "Maximum resident set size": the process and the children it
reaped itself, which for ``download`` are not the pool workers), and the process's own
``VmHWM`` read from /proc every 0.1 s. RSS over the run is sampled too, to show a slope:
RSS growth per 1000 images between 30 % and 90 % of the run (~0 when memory is bounded).

Not a test; not run by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    Table,
    code_version,
    find_tool,
    good_image,
    image_server,
    machine_info,
    median,
    pin_package,
    warm,
)

from downloader.usage import Measured, become_subreaper, measure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--counts", default="1000,20000", help="comma-separated image counts")
    p.add_argument("--backend", default="asyncio")
    p.add_argument("--size", default="320x240")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--thumbnail-size", type=int, help="pass --thumbnail-size (0 = off)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--local", action="store_true", help="use download --local, no server here")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--extra", default="", help="more flags for download, e.g. '--output-format webdataset'"
    )
    p.add_argument("--download", help="path of the download command [beside python / PATH]")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="run the live working tree (default: a copy of downloader/ taken at start)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run, then killed")
    p.add_argument("--json", type=Path, help="also write raw numbers here")
    return p.parse_args(argv)


def command(args: argparse.Namespace, download: str, count: int, out: Path, base: str) -> list[str]:
    cmd = [download, "--backend", args.backend, "-n", str(count), "--size", args.size]
    cmd += ["--concurrency", str(args.concurrency), "--out", str(out), "-q"]
    if args.local:
        cmd += ["--local", "--latency-ms", f"{args.latency_ms:g}"]
    else:
        cmd += ["--url", f"{base}/{{width}}/{{height}}?lock={{i}}"]
    if args.thumbnail_size is not None:
        cmd += ["--thumbnail-size", str(args.thumbnail_size)]
    return cmd + args.extra.split()


def count_ok(out: Path) -> int:
    """The images saved: JPEG files, or the samples of the shards of a shard format."""
    if not out.is_dir():
        return 0
    tars = sorted(out.glob("[0-9]*.tar"))
    if tars:
        total = 0
        for path in tars:
            with tarfile.open(path) as tar:
                total += sum(1 for m in tar if m.name.endswith(".jpg"))
        return total
    return sum(1 for p in out.iterdir() if p.suffix == ".jpg" and good_image(p))


def slope_kb_per_1000(run: Measured, count: int) -> float:
    """Main-process RSS growth per 1000 images between 30 % and 90 % of the wall time
    (images assumed to arrive at an even rate)."""
    series = run.root_series
    if len(series) < 4 or run.wall_s < 10:  # short runs: start-up dominates, no slope
        return float("nan")

    def at(fraction: float) -> float:
        t = fraction * run.wall_s
        return float(min(series, key=lambda point: abs(point[0] - t))[1])

    images = 0.6 * count
    return (at(0.9) - at(0.3)) / images * 1000


def peak_at(run: Measured) -> float:
    """When the main process reached its peak RSS, as a fraction of the wall time."""
    if not run.root_series or run.wall_s <= 0:
        return float("nan")
    final = run.root_series[-1][2]
    first = next(t for t, _, hwm in run.root_series if hwm >= final)
    return first / run.wall_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    download = find_tool("download", args.download)
    if download is None:
        raise SystemExit("memory.py: cannot find the `download` command (use --download)")
    become_subreaper()
    version = code_version()
    width, height = (int(x) for x in args.size.lower().split("x"))
    runs: dict[int, list[tuple[Measured, int]]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory(prefix="memory-") as name, contextlib.ExitStack() as stack:
        root = Path(name)
        env = {**os.environ, **({} if args.no_pin else pin_package(root / "pinned"))}
        base, ignore = "", []
        if not args.local:
            server = stack.enter_context(image_server(download, args.latency_ms, 40, root, env))
            base, ignore = server.base_url, [server.proc.pid]
            warm(server, width, height, 40)
        for r in range(args.repeat):
            for count in counts:
                out = root / f"n{count}-{r}"
                cmd = command(args, download, count, out, base)
                if r == 0:
                    print("  $ " + " ".join(cmd), file=sys.stderr)
                m = measure(cmd, root / f"n{count}-{r}.log", env, args.timeout, ignore)
                ok = count_ok(out)
                runs[count].append((m, ok))
                print(
                    f"  [{r + 1}/{args.repeat}] n={count:<7} {m.wall_s:7.2f} s  {ok} ok  "
                    f"main peak {m.main_rss_mb:.1f} MB (wait4 {m.maxrss_mb:.1f} MB)",
                    file=sys.stderr,
                )
                shutil.rmtree(out, ignore_errors=True)

    table = Table(
        [
            "n", "ok", "wall s", "main peak RSS MB (VmHWM)", "main ru_maxrss MB (wait4)",
            "largest proc MB", "tree peak MB", "main RSS growth KB/1000 img", "peak at % of run",
        ]
    )  # fmt: skip
    summary: dict[int, dict[str, float]] = {}
    for count in counts:
        ms = [m for m, _ in runs[count]]
        main_hwm = median([m.main_rss_mb for m in ms])
        main_ru = median([m.maxrss_mb for m in ms])  # main + what main reaped
        slope = median([slope_kb_per_1000(m, count) for m in ms])
        summary[count] = {"main_hwm_mb": main_hwm, "main_ru_maxrss_mb": main_ru}
        table.rows.append(
            [
                str(count),
                f"{int(median([ok for _, ok in runs[count]]))}/{count}",
                f"{median([m.wall_s for m in ms]):.1f}",
                f"{main_hwm:.1f}",
                f"{main_ru:.1f}",
                f"{median([m.maxrss_mb for m in ms]):.1f}",
                f"{median([m.tree_rss_mb for m in ms]):.1f}",
                "n/a" if slope != slope else f"{slope:+.0f}",
                f"{100 * median([peak_at(m) for m in ms]):.0f}",
            ]
        )
    thumbs = "default (128)" if args.thumbnail_size is None else str(args.thumbnail_size)
    source = "--local" if args.local else "a separate download serve"
    print(
        f"download --backend {args.backend}, {args.size}, concurrency {args.concurrency}, "
        f"thumbnails {thumbs}, against {source}; medians of {args.repeat} "
        f"({machine_info()['cpus']} CPUs, load {os.getloadavg()[0]:.2f})"
    )
    print(table.render())
    print(f"code measured: downloader {version}" + ("" if args.no_pin else " (pinned copy)"))
    small, big = min(counts), max(counts)
    if small != big:
        for key, label in (("main_hwm_mb", "VmHWM"), ("main_ru_maxrss_mb", "ru_maxrss")):
            a, b = summary[small][key], summary[big][key]
            print(
                f"main peak RSS ({label}): n={big} / n={small} = {b:.1f} / {a:.1f} MB = "
                f"{b / a:.2f}x for {big / small:g}x the images"
            )
    if args.json is not None:
        data = {
            "backend": args.backend,
            "size": args.size,
            "concurrency": args.concurrency,
            "thumbnail_size": args.thumbnail_size,
            "local": args.local,
            "code": version,
            "pinned": not args.no_pin,
            "machine": machine_info(),
            "runs": {
                str(count): [
                    {**asdict(m), "ok": ok, "root_series": m.root_series[::10]}
                    for m, ok in runs[count]
                ]
                for count in counts
            },
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    bad = any(ok != count for count in counts for _, ok in runs[count])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
