"""A dataset build, us against img2dataset: the same parquet of URLs, the same options.

    python benchmarks/dataset.py [-n 2000] [--repeat 3] [--backends asyncio,hybrid]
                                 [--img2dataset PATH] [--out-root DIR]

Both tools read one parquet of N URLs (with a caption column) from the built-in server
(640x480 JPEGs, in its own process), resize with ``center_crop`` to 256 px, encode JPEG and
write webdataset shards of 1000 to ``--out-root`` (default: this machine's disk, /var/tmp).
img2dataset runs as its README advises for one machine: 2 processes x 64 threads. Each run
is one whole process tree (wall time, CPU of every process, peak RSS), in rotated order,
medians of ``--repeat``; every run's shards are read back (tarfile) and counted.

Not a test and not run by CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import Table, code_version, find_tool, image_server, machine_info, median, warm

from downloader.usage import Measured, become_subreaper, measure

SIZE, PER_SHARD, POOL = 256, 1000, 40


@dataclass
class Tool:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    runs: list[Measured] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)


def ours(download: str, backend: str, urls: Path, concurrency: int) -> Tool:
    return Tool(f"downloader {backend}", [
        download, "--backend", backend, "--urls", str(urls), "--caption-col", "caption",
        "--output-format", "webdataset", "--samples-per-shard", str(PER_SHARD),
        "--resize-mode", "center_crop", "--image-size", str(SIZE), "--encode-format", "jpg",
        "--concurrency", str(concurrency), "-q",
    ])  # fmt: skip


def img2dataset(exe: str, urls: Path) -> Tool:
    return Tool("img2dataset", [
        exe, "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_format", "webdataset",
        "--number_sample_per_shard", str(PER_SHARD), "--resize_mode", "center_crop",
        "--image_size", str(SIZE), "--encode_format", "jpg", "--processes_count", "2",
        "--thread_count", "64", "--enable_wandb", "False",
    ], {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"})  # fmt: skip


def count_samples(out: Path) -> int:
    """Images in every tar under ``out``, each read to its end."""
    count = 0
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    blob = tar.extractfile(member)
                    count += blob is not None and len(blob.read()) == member.size
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--count", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backends", default="asyncio,hybrid")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--img2dataset", help="path of img2dataset [beside python / PATH]")
    p.add_argument("--out-root", default="/var/tmp", help="where the shards go (a disk)")
    args = p.parse_args(argv)
    if not become_subreaper():  # forkserver children are counted only when reaped here
        print("warning: not a subreaper: CPU of orphaned workers is missed", file=sys.stderr)

    import pyarrow as pa
    import pyarrow.parquet as pq

    download = find_tool("download")
    if download is None:
        raise SystemExit("dataset.py: cannot find the `download` command")
    root = Path(tempfile.mkdtemp(prefix="dataset-bench-", dir=args.out_root))
    urls = root / "urls.parquet"
    tools = [ours(download, b, urls, args.concurrency) for b in args.backends.split(",")]
    exe = find_tool("img2dataset", args.img2dataset)
    if exe:
        tools.append(img2dataset(exe, urls))
    else:
        print("img2dataset not found: pip install img2dataset", file=sys.stderr)
    try:
        with image_server(download, pool_size=POOL, log_dir=root) as server:
            warm(server, 640, 480, POOL)
            rows = [
                {"url": f"{server.base_url}/640/480?lock={i}", "caption": f"photo {i}"}
                for i in range(args.count)
            ]
            pq.write_table(pa.Table.from_pylist(rows), urls)
            for r in range(args.repeat):
                shift = r % len(tools)
                for tool in tools[shift:] + tools[:shift]:
                    out = root / f"out-{r}"
                    shutil.rmtree(out, ignore_errors=True)
                    flag = "--output_folder" if tool.name == "img2dataset" else "--out"
                    m = measure([*tool.command, flag, str(out)], root / "run.log",
                                {**os.environ, **tool.env}, ignore=[server.proc.pid])  # fmt: skip
                    tool.runs.append(m)
                    tool.samples.append(count_samples(out))
                    print(f"  [{r + 1}/{args.repeat}] {tool.name:<20} {m.wall_s:6.2f} s "
                          f"cpu {m.cpu_s:6.2f} s  {tool.samples[-1]} samples  exit "
                          f"{m.returncode}", file=sys.stderr)  # fmt: skip
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(render(tools, args))
    return 0


def render(tools: list[Tool], args: argparse.Namespace) -> str:
    base = next((t for t in tools if t.name == "img2dataset"), None)
    table = Table(["tool", "images/s", "CPU ms/img", "peak RSS MB", "samples", "vs img2dataset"])

    def rate(t: Tool) -> float:
        return median([n / m.wall_s for n, m in zip(t.samples, t.runs, strict=True)])

    def cpu(t: Tool) -> float:
        return median([m.cpu_s * 1000 / max(1, n) for n, m in zip(t.samples, t.runs, strict=True)])

    for t in tools:
        vs = ""
        if base is not None and t is not base and rate(base) > 0:
            vs = f"{rate(t) / rate(base):.2f}x images/s, {cpu(t) / cpu(base):.2f}x CPU"
        table.rows.append([
            t.name, f"{rate(t):.1f}", f"{cpu(t):.2f}",
            f"{median([m.tree_rss_mb for m in t.runs]):.0f}", f"{min(t.samples)}/{args.count}", vs,
        ])  # fmt: skip
    head = (f"{args.count} URLs (parquet, with captions), 640x480 -> center_crop {SIZE}, jpg, "
            f"webdataset shards of {PER_SHARD}, out on {args.out_root}; medians of {args.repeat};"
            f" code {code_version()}; {machine_info()}")  # fmt: skip
    return head + "\n\n" + table.render()


if __name__ == "__main__":
    raise SystemExit(main())
