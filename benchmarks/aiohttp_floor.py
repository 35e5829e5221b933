#!/usr/bin/env python3
"""The floor for any aiohttp-based downloader: one session, C tasks, ``await resp.read()``
and nothing else (no check, no hash, no file, no manifest, no retry).

    download serve --port 18080 &
    python -m downloader.usage --report floor.json -- \\
        python benchmarks/aiohttp_floor.py http://127.0.0.1:18080/640/480 -n 2000 -c 64

``cpu_s / n`` of the report is what aiohttp alone costs an image (start-up included); set
it beside ``download --thumbnail-size 0 --verify header`` and curl on the same server.
Not a test; not run by CI.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp


async def fetch_all(base: str, count: int, concurrency: int) -> int:
    urls = iter(range(count))
    fetched = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            nonlocal fetched
            for i in urls:  # one iterator shared by every task: each index once
                async with s.get(f"{base}?lock={i}") as resp:
                    fetched += bool(await resp.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return fetched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("base", help="e.g. http://127.0.0.1:18080/640/480")
    p.add_argument("-n", "--count", type=int, default=2000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    args = p.parse_args()
    got = asyncio.run(fetch_all(args.base, args.count, args.concurrency))
    print(f"{got} of {args.count} bodies read")
    if got != args.count:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
