#!/usr/bin/env python3
"""Our backends against peer tools (img2dataset, curl, aria2c) on one built-in server.

    python benchmarks/peers.py [-n 2000] [--size 640x480] [--latency-ms 0]
        [--concurrency 64] [--repeat 3] [--only asyncio,curl] [--envs clean,no-proxy]
        [--json FILE]

Every run is a whole process (start-up included), timed from spawn to exit, in a fresh
output folder, against ONE ``download serve`` process started here and warmed up (every
photo of the pool rendered once). Runs are interleaved per repeat, in a rotated order, so
drift on a noisy machine spreads over every tool. Each run's output is verified: the saved
files are counted and must be non-empty JPEGs (a tool that saved nothing shows 0 ok).

Variants:
  <backend>      download --backend B ... (thumbnails 128 px, the default)
  <backend>-dl   the same with --thumbnail-size 0 (download + validate only)
  <backend>-dl-header  the same with --verify header (no pixel decode)
  img2dataset    --image_size 128 --resize_mode keep_ratio --output_format files
  curl           curl --parallel --parallel-max C -sL -K config   (download only)
  aria2c         aria2c -j C -i list -d DIR                        (download only)

Environments: every variant runs in each of ``--envs``, interleaved with the others:
``clean`` (this environment without any ``*_proxy`` variable) and ``no-proxy`` (the same
with ``NO_PROXY``/``no_proxy=127.0.0.1,localhost`` and no proxy, as containers, CI runners
and company laptops often have it). One table per environment, then issue 21's targets
for each, and what ``NO_PROXY`` costs each of our variants (its CPU over the clean one's).

Ratios: images/s of a thumbnail variant / img2dataset's, of a download-only variant /
curl's, from the same invocation and environment. Not a test; not run by CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from _targets import proxy_costs, targets

from downloader.usage import Measured, become_subreaper, measure, proc_cpu_s

BACKENDS = ("sync", "threads", "asyncio", "processes", "hybrid")
THUMB, DL = "thumbnails", "download-only"
LOOPBACK = "127.0.0.1,localhost"
ENVS = {  # name: (what is added to the clean environment, how the table names it)
    "clean": ({}, "no proxy variable"),
    "no-proxy": ({"NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}, f"NO_PROXY={LOOPBACK}, no proxy"),
}


def environment(name: str) -> dict[str, str]:
    """The environment of a run in ``name``: ours without any proxy variable, plus ENVS'."""
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return {**clean, **ENVS[name][0]}


@dataclass
class Workload:
    count: int
    width: int
    height: int
    latency_ms: float
    concurrency: int
    pool_size: int
    base_url: str = ""
    work: Path = Path()

    def url(self, i: int) -> str:
        return f"{self.base_url}/{self.width}/{self.height}?lock={i}"


@dataclass
class Variant:
    name: str
    tool: str
    kind: str  # THUMB or DL
    command: Callable[[Workload, Path], list[str]]
    count_ok: Callable[[Workload, Path], int]
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""


@dataclass
class Row:
    variant: Variant
    env: str = "clean"  # a key of ENVS
    runs: list[Measured] = field(default_factory=list)
    oks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    startup_s: float | None = None  # wall of one n=1 run (--startup): the fixed cost
    server_cpu: list[float] = field(default_factory=list)  # the server's CPU s during each run

    @property
    def label(self) -> str:
        return f"{self.variant.name}@{self.env}"

    def med(self, name: str) -> float:
        return median([getattr(run, name) for run in self.runs])

    @property
    def ok(self) -> int:
        return int(median(self.oks))

    @property
    def images_per_s(self) -> float:
        # Per run (ok images / wall), then the median: a run that saved nothing scores 0.
        return median([ok / run.wall_s for ok, run in zip(self.oks, self.runs, strict=True)])

    @property
    def cpu_ms_per_image(self) -> float:
        """CPU of the whole process tree per image saved, per run, then the median."""
        runs = zip(self.oks, self.runs, strict=True)
        return median([run.cpu_s * 1000 / ok if ok else math.inf for ok, run in runs])


# ---------------------------------------------------------------------------- our backends


def ours(download: str, backend: str, thumbnails: bool, verify: str = "full") -> Variant:
    def command(w: Workload, out: Path) -> list[str]:
        cmd = [download, "--backend", backend, "-n", str(w.count)]
        cmd += ["--url", f"{w.base_url}/{{width}}/{{height}}?lock={{i}}"]
        cmd += ["--size", f"{w.width}x{w.height}", "--concurrency", str(w.concurrency)]
        cmd += ["--out", str(out), "-q"]
        if not thumbnails:
            cmd += ["--thumbnail-size", "0"]
        if verify != "full":
            cmd += ["--verify", verify]
        return cmd

    def count_ok(w: Workload, out: Path) -> int:
        thumbs = out / "thumbnails"
        ok = 0
        for path in out.iterdir():
            image = path.is_file() and path.suffix == ".jpg" and good_image(path)
            if image and (not thumbnails or good_image(thumbs / path.name)):
                ok += 1
        return ok

    name = backend if thumbnails else f"{backend}-dl"
    if verify != "full":
        name += f"-{verify}"
    return Variant(name, backend, THUMB if thumbnails else DL, command, count_ok)


# ---------------------------------------------------------------------------- peers


def img2dataset(exe: str, threads: int | None) -> Variant:
    def command(w: Workload, out: Path) -> list[str]:
        urls = w.work / "urls.txt"
        # Two shards, so both processes get one (a single shard would use one process).
        per_shard = max(1, math.ceil(w.count / 2))
        return [
            exe,
            "--url_list", str(urls),
            "--input_format", "txt",
            "--output_folder", str(out),
            "--processes_count", "2",
            "--thread_count", str(threads or w.concurrency),
            "--image_size", "128",
            "--resize_mode", "keep_ratio",
            "--output_format", "files",
            "--number_sample_per_shard", str(per_shard),
            "--enable_wandb", "False",
        ]  # fmt: skip

    def count_ok(w: Workload, out: Path) -> int:
        return sum(1 for path in out.rglob("*.jpg") if good_image(path))

    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    note = "2 processes x --thread_count threads; keeps only the 128 px image"
    return Variant("img2dataset", "img2dataset", THUMB, command, count_ok, env, note)


def curl(exe: str) -> Variant:
    def command(w: Workload, out: Path) -> list[str]:
        config = w.work / "curl.cfg"
        if not config.exists():
            lines = [
                f'url = "{w.url(i)}"\noutput = "{{OUT}}/{i:06d}.jpg"\n' for i in range(w.count)
            ]
            config.write_text("".join(lines))
        run_config = out.parent / f"{out.name}.curl.cfg"
        run_config.write_text(config.read_text().replace("{OUT}", str(out)))
        out.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "--parallel", "--parallel-max", str(min(w.concurrency, 300))]
        return [*cmd, "-sL", "--fail", "-K", str(run_config)]

    return Variant("curl", "curl", DL, command, _count_flat)


def aria2c(exe: str) -> Variant:
    def command(w: Workload, out: Path) -> list[str]:
        listing = w.work / "aria2c.txt"
        if not listing.exists():
            listing.write_text("".join(f"{w.url(i)}\n  out={i:06d}.jpg\n" for i in range(w.count)))
        cmd = [exe, "-j", str(w.concurrency), "-i", str(listing), "-d", str(out)]
        return [*cmd, "--allow-overwrite=true", "-q"]

    return Variant("aria2c", "aria2c", DL, command, _count_flat)


def _count_flat(w: Workload, out: Path) -> int:
    if not out.is_dir():
        return 0
    return sum(1 for path in out.iterdir() if path.suffix == ".jpg" and good_image(path))


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--count", type=int, default=2000)
    p.add_argument("--size", default="640x480", help="WxH asked of the server")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pool-size", type=int, default=40)
    p.add_argument(
        "--only",
        help="comma-separated variant or tool names, e.g. asyncio,curl (asyncio = asyncio and "
        "asyncio-dl) or asyncio-dl,aria2c",
    )
    p.add_argument("--backends", default=",".join(BACKENDS), help="our backends to run")
    p.add_argument(
        "--envs",
        default=",".join(ENVS),
        help=f"environments to run every variant in: {', '.join(ENVS)} [all]",
    )
    p.add_argument("--download", help="path of the download command [beside python / PATH]")
    p.add_argument("--img2dataset", help="path of img2dataset [beside python / PATH]")
    p.add_argument("--i2d-threads", type=int, help="img2dataset --thread_count [concurrency]")
    p.add_argument(
        "--startup", action="store_true", help="also time one n=1 run per variant (fixed cost)"
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="run the live working tree (default: a copy of downloader/ taken at start)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run, then killed")
    p.add_argument("--keep", type=Path, help="keep outputs and logs here (else a temp dir)")
    p.add_argument("--json", type=Path, help="also write raw numbers here")
    return p.parse_args(argv)


def build_variants(args: argparse.Namespace) -> tuple[list[Variant], list[str]]:
    skipped: list[str] = []
    variants: list[Variant] = []
    download = find_tool("download", args.download)
    if download is None:
        raise SystemExit("peers.py: cannot find the `download` command (use --download)")
    for backend in (b.strip() for b in args.backends.split(",") if b.strip()):
        variants += [
            ours(download, backend, True),
            ours(download, backend, False),
            ours(download, backend, False, verify="header"),
        ]
    exe = find_tool("img2dataset", args.img2dataset)
    if exe:
        variants.append(img2dataset(exe, args.i2d_threads))
    else:
        skipped.append("img2dataset: not found beside python or on PATH (pip install img2dataset)")
    for name, make in (("curl", curl), ("aria2c", aria2c)):
        exe = shutil.which(name)
        if exe:
            variants.append(make(exe))
        else:
            skipped.append(f"{name}: not on PATH")
    if args.only:
        wanted = {token.strip() for token in args.only.split(",") if token.strip()}
        # Only the skips of tools that were asked for matter.
        skipped = [line for line in skipped if line.split(":")[0] in wanted]
        known = {v.name for v in variants} | {v.tool for v in variants}
        skipped += [
            f"{token}: not available"
            for token in wanted - known
            if token not in {line.split(":")[0] for line in skipped}
        ]
        variants = [v for v in variants if v.name in wanted or v.tool in wanted]
    return variants, skipped


def run_all(
    args: argparse.Namespace, variants: list[Variant], root: Path, pin: dict[str, str]
) -> list[Row]:
    width, height = (int(x) for x in args.size.lower().split("x"))
    w = Workload(args.count, width, height, args.latency_ms, args.concurrency, args.pool_size)
    w.work = root
    download = find_tool("download", args.download)
    assert download is not None
    rows = [Row(v, env) for env in args.envs for v in variants]
    ours_env = {**environment("clean"), **pin}
    with image_server(download, args.latency_ms, args.pool_size, root, ours_env) as server:
        w.base_url = server.base_url
        (root / "urls.txt").write_text("".join(w.url(i) + "\n" for i in range(w.count)))
        warm(server, width, height, args.pool_size)
        if args.startup:
            one = Workload(1, width, height, args.latency_ms, args.concurrency, args.pool_size)
            one.base_url, one.work = server.base_url, root / "n1"
            one.work.mkdir(exist_ok=True)
            (one.work / "urls.txt").write_text(one.url(0) + "\n")
            for row in rows:
                out = one.work / row.label
                cmd = row.variant.command(one, out)
                env = {**environment(row.env), **row.variant.env, **_pin_for(row, pin)}
                log = one.work / f"{row.label}.log"
                m = measure(cmd, log, env, args.timeout, ignore=[server.proc.pid])
                ok = row.variant.count_ok(one, out) if out.exists() else 0
                row.startup_s = m.wall_s if ok == 1 else float("nan")
                print(f"  [n=1] {row.label:<24} {m.wall_s:7.2f} s", file=sys.stderr)
        for r in range(args.repeat):
            shift = r % len(rows)
            for row in rows[shift:] + rows[:shift]:  # rotated: no tool is always first
                out = root / f"{row.label}-{r}"
                cmd = row.variant.command(w, out)
                env = {**environment(row.env), **row.variant.env, **_pin_for(row, pin)}
                log = root / f"{row.label}-{r}.log"
                if r == 0 and row.env == args.envs[0]:
                    print("  $ " + " ".join(cmd), file=sys.stderr)
                before = proc_cpu_s(server.proc.pid)
                m = measure(cmd, log, env, args.timeout, ignore=[server.proc.pid])
                row.server_cpu.append(proc_cpu_s(server.proc.pid) - before)
                ok = row.variant.count_ok(w, out) if out.exists() else 0
                row.runs.append(m)
                row.oks.append(ok)
                if m.returncode != 0 or ok != w.count:
                    last = (m.log_tail.strip().splitlines() or ["(no output)"])[-1][:200]
                    row.errors.append(f"run {r}: exit {m.returncode}, {ok} ok; last line: {last}")
                print(
                    f"  [{r + 1}/{args.repeat}] {row.label:<24} {m.wall_s:7.2f} s  "
                    f"{ok:>6} ok  exit {m.returncode}  cpu {m.cpu_s:6.2f} s",
                    file=sys.stderr,
                )
                if args.keep is None:
                    shutil.rmtree(out, ignore_errors=True)
    return rows


def _pin_for(row: Row, pin: dict[str, str]) -> dict[str, str]:
    return pin if row.variant.tool in BACKENDS else {}


def ratio(row: Row, rows: list[Row]) -> str:
    base = "img2dataset" if row.variant.kind == THUMB else "curl"
    ref = next((r for r in rows if r.variant.name == base and r.env == row.env), None)
    if ref is None or row is ref:
        return "-" if row is ref else "n/a"
    if ref.images_per_s == 0:
        return "inf" if row.images_per_s > 0 else "n/a"
    x = row.images_per_s / ref.images_per_s
    verdict = "faster" if x >= 1.05 else "SLOWER" if x <= 0.95 else "same"
    return f"{x:.2f}x vs {base} ({verdict})"


def render(rows: list[Row], args: argparse.Namespace) -> str:
    head = (
        f"{args.count} images of {args.size}, server latency {args.latency_ms:g} ms, "
        f"concurrency {args.concurrency}, medians of {args.repeat} runs "
        f"({machine_info()['cpus']} CPUs, load {os.getloadavg()[0]:.2f})"
    )
    parts = [head]
    for env in args.envs:
        in_env = [row for row in rows if row.env == env]
        parts += ["", f"environment {env} ({ENVS[env][1]}):", _table(in_env, args)]
        parts.append(_against_ideal(in_env, args))
    parts += ["", *targets(rows, args.envs, args.latency_ms, _ideal_s(args))]
    parts += proxy_costs(rows, args.envs, BACKENDS)
    return "\n".join(part for part in parts if part is not None)


def _table(rows: list[Row], args: argparse.Namespace) -> str:
    table = Table(
        [
            "tool/variant", "kind", "median wall s", "images/s", "CPU ms/image", "CPU s",
            "server CPU s",
            "peak RSS MB", "tree RSS MB", "ok", "ratio (images/s)",
        ] + (["n=1 wall s"] if args.startup else [])
    )  # fmt: skip
    for row in rows:
        table.rows.append(
            [
                row.variant.name,
                row.variant.kind,
                f"{row.med('wall_s'):.2f}",
                f"{row.images_per_s:.1f}",
                f"{row.cpu_ms_per_image:.2f}",
                f"{row.med('cpu_s'):.2f}",
                f"{median(row.server_cpu):.2f}",
                f"{row.med('maxrss_mb'):.0f}",
                f"{row.med('tree_rss_mb'):.0f}",
                f"{row.ok}/{args.count}",
                ratio(row, rows),
            ]
            + ([f"{row.startup_s:.2f}"] if args.startup else [])
        )
    return table.render()


def _against_ideal(rows: list[Row], args: argparse.Namespace) -> str | None:
    """With latency, the ideal wall time is n x latency / concurrency: how far each run is."""
    if args.latency_ms <= 0:
        return None
    ideal = _ideal_s(args)
    parts = [f"{row.variant.name} {row.med('wall_s') / ideal:.2f}x" for row in rows]
    return f"wall time vs the ideal n x latency / concurrency = {ideal:.2f} s: " + ", ".join(parts)


def _ideal_s(args: argparse.Namespace) -> float:
    return args.count * args.latency_ms / 1000 / args.concurrency


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.envs = [name.strip() for name in args.envs.split(",") if name.strip()]
    if not args.envs or set(args.envs) - set(ENVS):
        print(f"--envs: choose among {', '.join(ENVS)}", file=sys.stderr)
        return 2
    subreaper = become_subreaper()
    variants, skipped = build_variants(args)
    if not subreaper:
        print("warning: not a subreaper: CPU of orphaned grandchildren is missed", file=sys.stderr)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    if not variants:
        print("nothing to run", file=sys.stderr)
        return 2
    version = code_version()
    with tempfile.TemporaryDirectory(prefix="peers-") as name:
        root = Path(name)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            root = args.keep
        pin = {} if args.no_pin else pin_package(Path(name) / "pinned")
        rows = run_all(args, variants, root, pin)
    after = code_version()
    print(render(rows, args))
    print(f"code measured: downloader {version}" + ("" if args.no_pin else " (pinned copy)"))
    if args.no_pin and after != version:
        print(f"WARNING: the working tree changed during the run ({version} -> {after})")
    for line in skipped:
        print(f"skipped: {line}")
    for row in rows:
        for error in row.errors:
            print(f"problem: {row.label} {error}")
    print(
        "peak RSS = largest single process (wait4 ru_maxrss); tree RSS = peak of the summed RSS "
        "of the whole process tree, sampled every 0.1 s; CPU s = user+sys of the whole tree "
        "(forkserver children and orphans included, start-up included); CPU ms/image = that "
        "over the images saved; "
        "server CPU s = what the image server used meanwhile (same 2 cores)."
    )
    if args.json is not None:
        data = to_json(rows, args, skipped, subreaper, version)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    failed = any(row.errors for row in rows)
    return 1 if failed else 0


def to_json(
    rows: list[Row], args: argparse.Namespace, skipped: list[str], reaper: bool, version: str
) -> dict:
    return {
        "count": args.count,
        "size": args.size,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "machine": machine_info(),
        "code": version,
        "pinned": not args.no_pin,
        "subreaper": reaper,
        "skipped": skipped,
        "envs": {name: ENVS[name][1] for name in args.envs},
        "variants": {
            row.label: {
                "env": row.env,
                "tool": row.variant.tool,
                "kind": row.variant.kind,
                "note": row.variant.note,
                "wall_s_median": row.med("wall_s"),
                "images_per_s_median": row.images_per_s,
                "cpu_s_median": row.med("cpu_s"),
                "cpu_ms_per_image_median": row.cpu_ms_per_image,
                "server_cpu_s_median": median(row.server_cpu),
                "peak_rss_mb_median": row.med("maxrss_mb"),
                "tree_rss_mb_median": row.med("tree_rss_mb"),
                "ok_median": row.ok,
                "ratio": ratio(row, rows),
                "startup_wall_s_n1": row.startup_s,
                "errors": row.errors,
                "runs": [
                    {**asdict(run), "ok": ok, "server_cpu_s": cpu, "root_series": None}
                    for run, ok, cpu in zip(row.runs, row.oks, row.server_cpu, strict=True)
                ],
            }
            for row in rows
        },
    }


if __name__ == "__main__":
    sys.exit(main())
