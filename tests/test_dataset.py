"""Dataset output: webdataset and parquet shards with captions and columns, read back by
webdataset, pyarrow, tarfile and Pillow; resize and encode modes, filters, the
X-Robots-Tag opt-out; input tables in every format."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import gzip
import io
import json
import os
import signal
import tarfile
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from aiohttp import web
from helpers import (
    CONTRACT_BACKENDS,
    by_index,
    cli_args,
    entry_key,
    invoke,
    jpeg,
    launched,
    make_settings,
    records,
    run_cli,
    server_stats,
    tree_after_lines,
)
from PIL import Image

from downloader.errors import ConfigError
from downloader.inputs import Columns, format_of, read_rows
from downloader.pipeline import run
from downloader.server import RunningServer, make_app, server_thread
from downloader.settings import DatasetSettings, HttpSettings, ServerSettings, Settings


def png_rgba(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (0, 0, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


class Site:
    """A small image site: /img/N (640x480 JPEG), /noai/N and /scoped/N (opted out by
    X-Robots-Tag, for everyone or for otherbot), /tiny/N (20x20), /alpha/N (a transparent
    PNG), /gone/N (404). Counts every request."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.agents: list[str] = []
        self.server = RunningServer("127.0.0.1", 0)

    def app(self) -> web.Application:
        async def serve(request: web.Request) -> web.Response:
            kind, n = request.match_info["kind"], int(request.match_info["n"])
            self.hits[f"{kind}/{n}"] += 1
            self.agents.append(request.headers.get("User-Agent", ""))
            if kind == "gone":
                raise web.HTTPNotFound()
            if kind == "tiny":
                return web.Response(body=jpeg(n, (20, 20)), content_type="image/jpeg")
            if kind == "alpha":
                return web.Response(body=png_rgba((60, 40)), content_type="image/png")
            headers = {
                "noai": {"X-Robots-Tag": "noai"},
                "scoped": {"X-Robots-Tag": "otherbot: noai"},
            }
            return web.Response(
                body=jpeg(n, (640, 480)), content_type="image/jpeg", headers=headers.get(kind, {})
            )

        app = web.Application()
        app.router.add_get("/{kind}/{n}", serve)
        return app

    def url(self, kind: str, n: int) -> str:
        return f"{self.server.base_url}/{kind}/{n}"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    state = Site()
    with server_thread(state.app()) as running:
        state.server = running
        yield state


def table_rows(site: Site, count: int, bad: dict[int, str] | None = None) -> list[dict[str, Any]]:
    kinds = bad or {}
    return [
        {"url": site.url(kinds.get(i, "img"), i), "text": f"photo {i}", "n": i, "tag": f"t{i % 3}"}
        for i in range(count)
    ]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    return path


def dataset_settings(backend: str, out: Path, urls: Path, **dataset: Any) -> Settings:
    base = make_settings(backend, out, "http://unused/{i}", 1)
    return base.replace(
        urls=str(urls),
        thumbnails=base.thumbnails.__class__(size=0),
        dataset=DatasetSettings(**{"caption_col": "text", "save_additional_columns": "n,tag",
                                   "samples_per_shard": 10, **dataset}),
    )  # fmt: skip


def read_webdataset(tars: list[Path]) -> list[dict[str, Any]]:
    """Every sample of ``tars``, as webdataset decodes them. webdataset leaves its last
    shard's file to the garbage collector (a ResourceWarning): collected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(wds.WebDataset([str(p) for p in tars], shardshuffle=False).decode("pil"))
        gc.collect()
    return samples


def shard_files(out: Path, suffix: str) -> list[Path]:
    return sorted(p for p in out.glob(f"[0-9]*{suffix}") if "_stats" not in p.name)


BAD = {3: "gone", 7: "noai", 12: "tiny", 15: "scoped"}


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_webdataset_shards_with_captions_on_every_backend(
    backend: str, site: Site, tmp_path: Path
) -> None:
    rows = table_rows(site, 23, BAD)
    urls = write_parquet(tmp_path / "urls.parquet", rows)
    out = tmp_path / "out"
    report = run(
        dataset_settings(backend, out, urls, output_format="webdataset", min_image_size=32)
    )

    assert (report.ok, report.failed) == (20, 3)  # 3 gone, 7 opted out, 12 too small
    tars = shard_files(out, ".tar")
    assert [p.name for p in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = read_webdataset(tars)
    keys = [s["__key__"] for s in samples]
    assert sorted(int(k) for k in keys) == sorted(set(range(23)) - {3, 7, 12})
    assert len(set(keys)) == len(keys)
    for sample in samples:
        i = int(sample["__key__"])
        assert sample["txt"] == f"photo {i}"
        assert sample["jpg"].size == (640, 480)
        meta = sample["json"]
        assert (meta["url"], meta["n"], meta["tag"], meta["status"]) == (
            rows[i]["url"],
            i,
            f"t{i % 3}",
            "success",
        )
    # The metadata beside each shard: one row per input row, saved or not, with img2dataset's words.
    meta = pa.concat_tables([pq.read_table(p.with_suffix(".parquet")) for p in tars]).to_pylist()
    assert sorted(r["key"] for r in meta) == [f"{i:09d}" for i in range(23)]
    status = {int(r["key"]): r for r in meta}
    assert status[3]["status"] == "failed_to_download" and "404" in status[3]["error_message"]
    assert (
        status[7]["status"] == "failed_to_download"
        and "X-Robots-Tag noai" in status[7]["error_message"]
    )
    assert (
        status[12]["status"] == "failed_to_resize"
        and "image too small" in status[12]["error_message"]
    )
    assert status[15]["status"] == "success"  # scoped to another agent
    assert pq.read_schema(tars[0].with_suffix(".parquet")).field("n").type == pa.int64()
    stats = [json.loads((out / f"{k:05d}_stats.json").read_text()) for k in range(3)]
    assert [s["count"] for s in stats] == [10, 10, 3]
    assert [s["successes"] for s in stats] == [8, 9, 3]
    assert stats[1]["failed_to_resize"] == 1 and stats[0]["failed_to_download"] == 2
    # The manifest stays the source of truth: one line per image, naming shard and key.
    lines = {r["index"]: r for r in records(out)}
    assert sorted(lines) == list(range(23))
    assert lines[21]["path"] == "00002.tar" and lines[21]["key"] == "000000021"
    assert lines[21]["caption"] == "photo 21" and lines[21]["columns"] == {"n": 21, "tag": "t0"}


@pytest.mark.parametrize("backend", ["threads", "hybrid"])
def test_parquet_shards_hold_the_image_bytes(backend: str, site: Site, tmp_path: Path) -> None:
    rows = table_rows(site, 14, {2: "gone", 5: "alpha"})
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    settings = dataset_settings(
        backend, out, urls, output_format="parquet", resize_mode="center_crop", image_size=64
    )
    report = run(settings)

    assert (report.ok, report.failed) == (13, 1)
    table = pa.concat_tables([pq.read_table(p) for p in shard_files(out, ".parquet")])
    assert table.num_rows == 14 and "jpg" in table.schema.names
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert (
        by_key["000000002"]["jpg"] is None and by_key["000000002"]["status"] == "failed_to_download"
    )
    for i in set(range(14)) - {2}:
        row = by_key[f"{i:09d}"]
        image = Image.open(io.BytesIO(row["jpg"]))
        assert (image.format, image.size) == ("JPEG", (64, 64))
        assert (row["width"], row["height"]) == (64, 64)
        assert row["caption"] == f"photo {i}" and row["n"] == i
    assert (by_key["000000000"]["original_width"], by_key["000000000"]["original_height"]) == (
        640,
        480,
    )
    # Transparency goes on white, not black.
    alpha = Image.open(io.BytesIO(by_key["000000005"]["jpg"])).convert("RGB")
    assert min(alpha.getpixel((32, 32))) > 240


def test_files_output_resizes_and_resume_keeps_what_it_resized(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    settings = make_settings("asyncio", out, site.url("img", 0).replace("/0", "/{i}"), 4).replace(
        dataset=DatasetSettings(
            resize_mode="keep_ratio_largest", image_size=100, encode_format="png"
        )
    )
    assert run(settings).ok == 4
    lines = {r["index"]: r for r in records(out)}
    for line in lines.values():
        assert str(line["path"]).endswith(".png")
        with Image.open(out / str(line["path"])) as image:
            assert image.size == (100, 75)
        assert (line["original_width"], line["original_height"]) == (640, 480)
    before = sum(site.hits[f"img/{i}"] for i in range(4))
    again = run(settings.replace(resume=True))
    assert (again.ok, again.skipped) == (0, 4)
    assert sum(site.hits[f"img/{i}"] for i in range(4)) == before


def test_files_output_keeps_the_downloaded_bytes_without_a_resize(
    site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    settings = make_settings("sync", out, site.url("alpha", 0).replace("/0", "/{i}"), 1)
    assert run(settings).ok == 1
    (line,) = records(out)
    assert (out / str(line["path"])).read_bytes() == png_rgba((60, 40))
    assert "original_width" not in line and "key" not in line  # a plain run's lines as before


@pytest.mark.parametrize(
    ("directives", "token", "saved"),
    [
        ("noai,noimageai,noindex,noimageindex", "", {"img", "scoped"}),
        ("noai", "otherbot", {"img"}),
        ("", "", {"img", "noai", "scoped"}),
    ],
)
def test_x_robots_tag_opt_out(
    site: Site, tmp_path: Path, directives: str, token: str, saved: set[str]
) -> None:
    urls = tmp_path / "urls.txt"
    kinds = ["img", "noai", "scoped"]
    urls.write_text("".join(site.url(k, 40 + i) + "\n" for i, k in enumerate(kinds)))
    settings = make_settings("threads", tmp_path / "out", "http://unused/{i}", 1).replace(
        urls=str(urls),
        http=HttpSettings(disallowed_header_directives=directives, user_agent_token=token),
    )
    run(settings)
    ok = {kinds[r["index"]] for r in records(tmp_path / "out") if r["status"] == "ok"}
    assert ok == saved


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_the_user_agent_token_is_in_the_user_agent(
    backend: str, site: Site, tmp_path: Path
) -> None:
    url = site.url("img", 0).replace("/0", "/{i}")
    settings = make_settings(backend, tmp_path / "out", url, 1)
    settings = settings.replace(http=dataclasses.replace(settings.http, user_agent_token="mybot"))
    site.agents.clear()
    assert run(settings).ok == 1
    assert site.agents and all(a.endswith("(compatible; mybot)") for a in site.agents)


# ---------------------------------------------------------------------------- inputs


def test_every_input_format_gives_the_same_rows(tmp_path: Path) -> None:
    rows = [{"url": f"http://h/{i}.jpg", "text": f"c{i}", "n": i} for i in range(5)]
    csv_text = "url,text,n\n" + "".join(f"{r['url']},{r['text']},{r['n']}\n" for r in rows)
    files = {
        "a.csv": csv_text,
        "a.tsv": csv_text.replace(",", "\t"),
        "a.json": json.dumps(rows),
        "a.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        with gzip.open(tmp_path / f"{name}.gz", "wt") as fh:
            fh.write(text)
    write_parquet(tmp_path / "a.parquet", rows)
    columns = Columns("url", "text", ("n",))
    for path in sorted(tmp_path.iterdir()):
        got = list(read_rows(str(path), format_of(str(path)), columns))
        assert [r.url for r in got] == [r["url"] for r in rows], path.name
        assert [r.caption for r in got] == [r["text"] for r in rows], path.name
        typed = not path.name.startswith(("a.csv", "a.tsv"))
        assert [r.columns["n"] for r in got] == [i if typed else str(i) for i in range(5)], (
            path.name
        )


def test_a_missing_column_is_one_line_before_any_fetch(tmp_path: Path) -> None:
    urls = write_parquet(tmp_path / "urls.parquet", [{"link": "http://h/1.jpg", "alt": "x"}])
    with pytest.raises(ConfigError, match=r"no .url. column .*columns: link, alt"):
        read_rows(str(urls), "parquet", Columns())
    result = invoke("--urls", str(urls), "--url-col", "link", "--caption-col", "caption",
                    "--out", str(tmp_path / "out"), "-q")  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: no 'caption' column in {urls} (columns: link, alt)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_json_array_is_read_one_object_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    rows = [{"url": f"http://h/{i}.jpg", "pad": "x" * 500} for i in range(400)]
    path.write_text(json.dumps(rows))
    got = read_rows(str(path), "json", Columns())
    assert [r.url for r in got] == [r["url"] for r in rows]
    (tmp_path / "cut.json").write_text(json.dumps(rows)[:-300])
    with pytest.raises(ConfigError, match="cut short"):
        list(read_rows(str(tmp_path / "cut.json"), "json", Columns()))


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# ---------------------------------------------------------------------------- crash safety


def read_tar_whole(path: Path) -> set[str]:
    """Every member of ``path`` read to its end (a torn tar raises): the sample keys."""
    with tarfile.open(path) as tar:
        keys = set()
        for member in tar:
            blob = tar.extractfile(member)
            assert blob is not None and len(blob.read()) == member.size
            keys.add(member.name.split(".", 1)[0])
    return keys


def keys_by_shard(out: Path) -> dict[str, set[int]]:
    return {p.name: {int(k) for k in read_tar_whole(p)} for p in shard_files(out, ".tar")}


@pytest.mark.parametrize("backend", ["asyncio", "hybrid"])
def test_kill_9_mid_shard_then_resume_loses_and_duplicates_nothing(
    backend: str, tmp_path: Path
) -> None:
    count, size = 120, 20
    out = tmp_path / "pic"
    shard_args = ["--output-format", "webdataset", "--samples-per-shard", str(size)]
    with server_thread(make_app(ServerSettings(seed=5, latency_ms=30))) as server:
        args = [*cli_args(backend, server.base_url, out, count), *shard_args]
        with launched(args, tmp_path) as proc:
            tree_after_lines(out, 50, proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        committed = keys_by_shard(out)  # every shard on disk reads whole
        killed = by_index(records(out))
        assert 50 <= len(killed) < count, "the kill should land mid-run"
        assert committed, "some shard should be committed before the kill"
        in_shards = set().union(*committed.values())
        kept = {i for i, line in killed.items() if line["status"] == "ok" and i in in_shards}

        before = server_stats(server)
        resumed = run_cli([*args, "--resume"], tmp_path)
        after = server_stats(server)

    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} kept" in resumed.stdout
    final = keys_by_shard(out)
    assert sorted(final) == [f"{k:05d}.tar" for k in range(count // size)]
    for name, keys in final.items():  # each index in its own shard, exactly once
        first = int(name[:5]) * size
        assert keys == set(range(first, first + size)), name
    lines = by_index(records(out))
    assert sorted(lines) == list(range(count))
    assert all(line["status"] == "ok" for line in lines.values())
    again = {i for i in range(count) if after[entry_key(i)] != before[entry_key(i)]}
    assert again == set(range(count)) - kept, "only what was not in a committed shard is fetched"
    assert not list(out.glob(".*.part")), "the killed run's temp shards were swept"


class Healing:
    """``/heal/{i}``: the ``broken`` indices answer 404 until ``healed``; counts requests."""

    def __init__(self, broken: set[int]) -> None:
        self.broken, self.healed = broken, False
        self.hits: Counter[int] = Counter()

    def app(self) -> web.Application:
        async def heal(request: web.Request) -> web.Response:
            index = int(request.match_info["i"])
            self.hits[index] += 1
            if index in self.broken and not self.healed:
                raise web.HTTPNotFound(text="not yet")
            return web.Response(body=jpeg(index, (64, 48)), content_type="image/jpeg")

        app = web.Application()
        app.router.add_get("/heal/{i}", heal)
        return app


@pytest.mark.parametrize(
    "backend", [b for b in ("threads", "processes", "dask") if b in CONTRACT_BACKENDS]
)
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_retry_failed_rewrites_only_the_shards_that_held_failures(
    backend: str, fmt: str, tmp_path: Path
) -> None:
    site = Healing({2, 5})
    out = tmp_path / "out"
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    with server_thread(site.app()) as server:
        settings = make_settings(backend, out, server.base_url + "/heal/{i}", 15).replace(
            dataset=DatasetSettings(output_format=fmt, samples_per_shard=5)
        )
        first = run(settings)
        assert (first.ok, first.failed) == (13, 2)
        untouched = (out / f"00002{suffix}").stat()
        site.healed = True
        hits = dict(site.hits)
        again = run(settings.replace(retry_failed=True))

    assert (again.ok, again.failed, again.skipped) == (2, 0, 13)
    assert {i for i in range(15) if site.hits[i] != hits.get(i, 0)} == {2, 5}
    after = (out / f"00002{suffix}").stat()
    assert (after.st_ino, after.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)
    for k in (0, 1):
        if fmt == "webdataset":
            keys = {int(key) for key in read_tar_whole(out / f"{k:05d}.tar")}
            table = pq.read_table(out / f"{k:05d}.parquet")
        else:
            table = pq.read_table(out / f"{k:05d}.parquet")
            keys = {int(r["key"]) for r in table.to_pylist() if r["jpg"] is not None}
        assert keys == set(range(5 * k, 5 * k + 5))
        assert sorted(int(r["key"]) for r in table.to_pylist()) == list(range(5 * k, 5 * k + 5))
        assert {r["status"] for r in table.to_pylist()} == {"success"}
        assert json.loads((out / f"{k:05d}_stats.json").read_text())["successes"] == 5


# ---------------------------------------------------------------------------- the service


async def test_a_service_job_builds_shards_and_serves_them(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from downloader.config import load_settings
    from downloader.service.app import make_app as service_app

    settings = load_settings(environ={}, overrides={"service.data": tmp_path / "data"})
    body = {
        "count": 7, "local": True, "thumbnails": {"size": 32},
        "dataset": {"output_format": "webdataset", "samples_per_shard": 5},
    }  # fmt: skip
    async with TestClient(TestServer(service_app(settings))) as client:
        created = await client.post("/api/v1/jobs", json=body)
        assert created.status == 201, await created.text()
        job = await created.json()
        deadline = asyncio.get_running_loop().time() + 60
        while job["state"] not in ("done", "failed", "cancelled"):
            assert asyncio.get_running_loop().time() < deadline, job
            await asyncio.sleep(0.05)
            job = await (await client.get(f"/api/v1/jobs/{job['id']}")).json()
        assert (job["state"], job["ok"]) == ("done", 7)
        lines = (await (await client.get(f"/api/v1/jobs/{job['id']}/manifest")).text()).splitlines()
        first = json.loads(lines[0])
        shard = await client.get(f"/files/{job['id']}/{first['path']}")
        assert shard.status == 200
        with tarfile.open(fileobj=io.BytesIO(await shard.read())) as tar:
            assert any(name.endswith(".jpg") for name in tar.getnames())
        thumb = await client.get(f"/files/{job['id']}/{first['thumbnail']}")  # the gallery's
        assert thumb.status == 200 and (await thumb.read()).startswith(b"\xff\xd8")


def test_typed_columns_every_format_can_hold_reach_the_manifest(site: Site, tmp_path: Path) -> None:
    import datetime
    import decimal

    rows = [
        {"url": site.url("img", 60), "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
         "price": decimal.Decimal("1.50"), "blob": b"\x00\xff", "n": 7},
    ]  # fmt: skip
    urls = write_parquet(tmp_path / "typed.parquet", rows)
    settings = make_settings("threads", tmp_path / "out", "http://unused/{i}", 1).replace(
        urls=str(urls), dataset=DatasetSettings(save_additional_columns="when,price,blob,n")
    )
    assert run(settings).ok == 1
    (line,) = records(tmp_path / "out")
    assert line["columns"] == {
        "when": "2026-01-02T03:04:05", "price": "1.50", "blob": "00ff", "n": 7,
    }  # fmt: skip


def test_json_keys_match_columns_as_a_csv_header_does(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"URL": "http://h/1.jpg", "Text": "one"}]))
    (tmp_path / "a.jsonl").write_text(
        '{"URL": "http://h/2.jpg"}\nnot json\n{"URL": "http://h/3.jpg"}\n'
    )
    got = list(read_rows(str(tmp_path / "a.json"), "json", Columns("url", "text")))
    assert [(r.url, r.caption) for r in got] == [("http://h/1.jpg", "one")]
    lines = list(read_rows(str(tmp_path / "a.jsonl"), "jsonl", Columns("url")))
    assert [r.url for r in lines] == ["http://h/2.jpg", "", "http://h/3.jpg"]
    (tmp_path / "b.jsonl").write_text('{"URL": "http://h/4.jpg"}\n{"url": "http://h/5.jpg"}\n')
    later = list(read_rows(str(tmp_path / "b.jsonl"), "jsonl", Columns("url")))
    assert [r.url for r in later] == ["http://h/4.jpg", "http://h/5.jpg"]
    with pytest.raises(ConfigError, match=r"no 'link' column .*\(columns: URL\)"):
        read_rows(str(tmp_path / "a.jsonl"), "jsonl", Columns("link"))


def test_a_file_named_gz_that_is_not_gzip_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "urls.csv.gz"
    fake.write_text("url\nhttp://h/1.jpg\n")
    result = invoke("--urls", str(fake), "--out", str(tmp_path / "out"), "-q")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: cannot read URL list {fake}: ") and "gzip" in line.lower()


def test_resume_does_not_keep_an_older_runs_sample_under_the_same_key(
    site: Site, tmp_path: Path
) -> None:
    # The state a run killed before its first commit leaves: its manifest lines (ok, this
    # run's URLs and digests) beside an older run's committed shard of the same keys.
    def listing(name: str, first: int) -> Path:
        path = tmp_path / name
        path.write_text("".join(site.url("img", first + i) + "\n" for i in range(5)))
        return path

    old, new = tmp_path / "old", tmp_path / "new"
    shards = DatasetSettings(output_format="webdataset", samples_per_shard=5)
    base = make_settings("threads", old, "http://unused/{i}", 1).replace(dataset=shards)
    assert run(base.replace(urls=str(listing("a.txt", 100)))).ok == 5
    b = listing("b.txt", 200)
    assert run(base.replace(out=new, urls=str(b))).ok == 5
    (old / "manifest.jsonl").write_bytes((new / "manifest.jsonl").read_bytes())

    again = run(base.replace(urls=str(b), resume=True))
    assert (again.ok, again.skipped) == (5, 0), "no image of the older shard is kept"
    with tarfile.open(old / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert sorted(m["url"] for m in metas) == sorted(b.read_text().split())


@pytest.mark.parametrize("backend", [b for b in ("threads", "dask") if b in CONTRACT_BACKENDS])
def test_a_fresh_run_into_old_shards_carries_none_of_their_rows(
    backend: str, site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shards = DatasetSettings(output_format="webdataset", samples_per_shard=10)
    first = make_settings("threads", out, site.url("img", 0).replace("/0", "/{i}"), 10)
    assert run(first.replace(dataset=shards)).ok == 10
    again = make_settings(backend, out, site.url("img", 0).replace("/0", "/3{i}"), 5)
    assert run(again.replace(dataset=shards)).ok == 5
    with tarfile.open(out / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert sorted(m["key"] for m in metas) == [f"{i:09d}" for i in range(5)]
    assert all("/img/3" in m["url"] for m in metas)
    assert sorted(r["index"] for r in records(out)) == list(range(5))


@pytest.mark.parametrize(
    ("values", "texts"),
    [([1, "one", {"a": 2}], ["1", "one", '{"a": 2}']), ([{}, {}, {}], ["{}", "{}", "{}"])],
    ids=["types-disagree", "empty-objects"],
)
def test_a_column_parquet_cannot_type_is_text_in_the_metadata(
    site: Site, tmp_path: Path, values: list[Any], texts: list[str]
) -> None:
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": site.url("img", 70 + i), "v": v}) + "\n"
                            for i, v in enumerate(values)))  # fmt: skip
    settings = dataset_settings("threads", tmp_path / "out", urls, output_format="webdataset",
                                caption_col="", save_additional_columns="v")  # fmt: skip
    assert run(settings).ok == 3
    table = pq.read_table(tmp_path / "out" / "00000.parquet")
    assert table.schema.field("v").type == pa.string()
    assert sorted(table.column("v").to_pylist()) == sorted(texts)


def test_a_shard_commits_on_a_thread_of_its_own(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from downloader.shards import ShardWriter

    threads: list[str] = []
    commit = ShardWriter.commit

    def recorded(self: ShardWriter) -> None:
        threads.append(threading.current_thread().name)
        commit(self)

    monkeypatch.setattr(ShardWriter, "commit", recorded)
    shards = DatasetSettings(output_format="webdataset", samples_per_shard=2)
    url = site.url("img", 0).replace("/0", "/{i}")
    assert run(make_settings("asyncio", tmp_path / "out", url, 5).replace(dataset=shards)).ok == 5
    assert len(threads) == 3 and all(name.startswith("shard-commit") for name in threads)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "00000.tar", "00001.tar", "00002.tar",
    ]  # fmt: skip
