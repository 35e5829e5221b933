"""OUT on object storage: shards written to a real S3 API on loopback (moto's standalone
server, started here on a free port; nothing of our calls is mocked), read back with
webdataset and pyarrow through s3fs; dask workers writing straight to the store; kill -9
and --resume there; the store's checks, its lock object, and credentials kept out of
every message and manifest."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import io
import json
import logging
import os
import shutil
import signal
import tarfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs
import webdataset as wds
from helpers import (
    by_index,
    child_env,
    cli_args,
    entry_key,
    invoke,
    launched,
    make_settings,
    records,
    run_cli,
    server_stats,
    tree_after_lines,
    wait_for,
)
from moto.server import ThreadedMotoServer

from downloader.errors import ConfigError, OutputInUseError
from downloader.lock import LOCK_OBJECT, OutputLock
from downloader.pipeline import run
from downloader.server import make_app, server_thread
from downloader.service.spec import job_settings, parse_body
from downloader.settings import (
    DatasetSettings,
    ServerSettings,
    ServiceSettings,
    Settings,
    ThumbnailSettings,
)
from downloader.stores import FsspecStore

KEY_ID, SECRET = "AKIATESTKEYNEVERSHOWN", "s3cr3t-value-that-must-never-be-shown"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module's tests."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """The standard variables every S3 tool reads, and no profile of the developer's."""
    return {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
    }


@pytest.fixture
def s3(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> s3fs.S3FileSystem:
    """An s3fs client of the endpoint, with the environment set for in-process runs."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in aws_env(endpoint, tmp_path).items():
        monkeypatch.setenv(name, value)
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def bucket(s3: s3fs.S3FileSystem) -> str:
    """A fresh bucket for the test."""
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3.mkdir(name)
    return name


def shard_settings(
    backend: str, base_url: str, out: str, state: Path, count: int, **dataset: Any
) -> Settings:
    settings = make_settings(
        backend, Path("unused"), base_url + "/{width}/{height}?lock={i}", count
    )
    return settings.replace(
        out=out,
        state=str(state),
        store="",
        thumbnails=ThumbnailSettings(size=0),
        dataset=DatasetSettings(
            **{"output_format": "webdataset", "samples_per_shard": 10, **dataset}
        ),
    )


def read_webdataset(s3: s3fs.S3FileSystem, urls: str) -> list[dict[str, Any]]:
    """The samples of ``urls`` (brace notation), as webdataset decodes them, opened
    through s3fs by webdataset's own scheme table."""
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: s3.open(url, mode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # webdataset leaves one to gc
            samples = list(
                wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
            )
            gc.collect()
    finally:
        schemes.pop("s3")
    return samples


def objects(s3: s3fs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[1]: s3.cat_file(p) for p in s3.ls(prefix, detail=False, refresh=True)}


def tar_keys(data: bytes) -> set[int]:
    """Every member of a tar read to its end (a torn tar raises): its sample keys."""
    keys = set()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            blob = tar.extractfile(member)
            assert blob is not None and len(blob.read()) == member.size
            keys.add(int(member.name.split(".", 1)[0]))
    return keys


# ---------------------------------------------------------------------------- shards to S3


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_shards_go_to_the_store_whole_and_read_back(
    s3: s3fs.S3FileSystem, bucket: str, tmp_path: Path, fmt: str
) -> None:
    state = tmp_path / "state"
    with server_thread(make_app(ServerSettings(seed=3))) as server:
        settings = shard_settings(
            "threads", server.base_url, f"s3://{bucket}/run/", state, 25, output_format=fmt
        )
        assert settings.store == f"s3://{bucket}/run" and settings.out == state
        report = run(settings)
    assert (report.ok, report.failed) == (25, 0)

    stored = objects(s3, f"{bucket}/run")
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    shards = [f"{k:05d}{suffix}" for k in range(3)]
    expected = {
        *shards,
        *(f"{k:05d}_stats.json" for k in range(3)),
        *(f"{k:05d}.jsonl" for k in range(3)),
    }
    if fmt == "webdataset":
        expected |= {f"{k:05d}.parquet" for k in range(3)}
    assert set(stored) == expected, "no temp object, no lock object left"
    if fmt == "webdataset":
        samples = read_webdataset(s3, f"s3://{bucket}/run/{{00000..00002}}.tar")
        assert sorted(int(s["__key__"]) for s in samples) == list(range(25))
        assert all(s["jpg"].size == (320, 240) for s in samples)
        meta = pq.read_table(f"{bucket}/run/00001.parquet", filesystem=s3).to_pylist()
    else:
        meta = pq.read_table(f"{bucket}/run/00001.parquet", filesystem=s3).to_pylist()
        assert all(row["jpg"][:2] == b"\xff\xd8" for row in meta)
    assert sorted(int(r["key"]) for r in meta) == list(range(10, 20))
    # The manifest: the local one in the state folder, and each shard's lines beside it.
    lines = by_index(records(state))
    assert sorted(lines) == list(range(25))
    beside = [json.loads(line) for k in range(3) for line in stored[f"{k:05d}.jsonl"].splitlines()]
    assert sorted(beside, key=lambda r: r["index"]) == [lines[i] for i in range(25)]
    assert not list(state.glob("[0-9]*")), "no shard in the local state folder"


def test_dask_workers_write_their_shards_straight_to_the_store(
    s3: s3fs.S3FileSystem, bucket: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with server_thread(make_app(ServerSettings(seed=4))) as server:
        settings = shard_settings("dask", server.base_url, f"s3://{bucket}/ds", state, 40)
        report = run(settings)
    assert (report.ok, report.failed) == (40, 0)

    samples = read_webdataset(s3, f"s3://{bucket}/ds/{{00000..00003}}.tar")
    keys = sorted(int(s["__key__"]) for s in samples)
    assert keys == list(range(40))
    stats = [json.loads(s3.cat_file(f"{bucket}/ds/{k:05d}_stats.json")) for k in range(4)]
    assert [s["successes"] for s in stats] == [10, 10, 10, 10]
    # The client wrote the manifest and nothing else: no shard, no temp file went through
    # a folder the workers share with it.
    assert sorted(p.name for p in state.iterdir()) == [
        ".downloader.lock",
        "manifest.jsonl",
        "thumbnails",
    ]
    assert list((state / "thumbnails").iterdir()) == []
    print(f"dask -> s3: {report.summary()}; webdataset read back {len(samples)} samples")


def test_kill_9_then_resume_on_the_store_loses_and_duplicates_nothing(
    s3: s3fs.S3FileSystem, bucket: str, endpoint: str, tmp_path: Path
) -> None:
    count, size = 120, 20
    state, url = tmp_path / "state", f"s3://{bucket}/killed"
    env = child_env(**aws_env(endpoint, tmp_path))
    with server_thread(make_app(ServerSettings(seed=5, latency_ms=30))) as server:
        args = [*cli_args("asyncio", server.base_url, Path("unused"), count), "--out", url,
                "--state", str(state), "--output-format", "webdataset",
                "--samples-per-shard", str(size)]  # fmt: skip
        with launched(args, tmp_path, env=env) as proc:
            tree_after_lines(state, 50, proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        stored = objects(s3, f"{bucket}/killed")
        assert LOCK_OBJECT in stored, "a killed run leaves its lock object"
        committed = {n: tar_keys(d) for n, d in stored.items() if n.endswith(".tar")}
        assert committed, "some shard should be committed before the kill"
        killed = by_index(records(state))
        assert 50 <= len(killed) < count, "the kill should land mid-run"
        in_shards = set().union(*committed.values())
        kept = {i for i, line in killed.items() if line["status"] == "ok" and i in in_shards}

        before = server_stats(server)
        resumed = run_cli([*args, "--resume"], tmp_path, env=env)
        after = server_stats(server)

    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} kept" in resumed.stdout
    stored = objects(s3, f"{bucket}/killed")
    final = {n: tar_keys(d) for n, d in stored.items() if n.endswith(".tar")}
    assert sorted(final) == [f"{k:05d}.tar" for k in range(count // size)]
    for name, keys in final.items():  # each index in its own shard, exactly once
        first = int(name[:5]) * size
        assert keys == set(range(first, first + size)), name
    lines = by_index(records(state))
    assert sorted(lines) == list(range(count)) and {r["status"] for r in lines.values()} == {"ok"}
    again = {i for i in range(count) if after[entry_key(i)] != before[entry_key(i)]}
    assert again == set(range(count)) - kept, "only what was not in a committed shard is fetched"
    assert LOCK_OBJECT not in stored and not [n for n in stored if n.endswith(".part")]
    print(f"kill -9 after {len(killed)} lines, {len(committed)} shards committed; "
          f"--resume: {resumed.stdout.strip()}; fetched again {len(again)}")  # fmt: skip


def test_resume_needs_only_the_store_when_the_state_folder_is_gone(
    s3: s3fs.S3FileSystem, bucket: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with server_thread(make_app(ServerSettings(seed=6))) as server:
        settings = shard_settings("asyncio", server.base_url, f"s3://{bucket}/r", state, 30)
        assert run(settings).ok == 30
        shutil.rmtree(state)
        hits = server_stats(server)
        again = run(settings.replace(resume=True))
        assert server_stats(server) == hits, "nothing fetched again"
    assert (again.ok, again.skipped) == (0, 30)
    assert sorted(by_index(records(state))) == list(range(30))


@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_retry_failed_rewrites_the_shards_that_held_failures_from_the_store(
    s3: s3fs.S3FileSystem, bucket: str, tmp_path: Path, backend: str
) -> None:
    state, prefix = tmp_path / "state", f"{bucket}/retry"
    # The built-in server fails the first request of 2, 6 and 15 (503): shard 2 has none.
    with server_thread(make_app(ServerSettings(seed=1, fail_rate=0.1, retry_after=0))) as server:
        settings = shard_settings(backend, server.base_url, f"s3://{prefix}", state, 30)
        settings = settings.replace(http=dataclasses.replace(settings.http, retries=0))
        first = run(settings)
        failed = {r.index for r in first.results if not r.ok}
        assert failed == {2, 6, 15}
        clean = [2]
        untouched = {k: s3.info(f"{prefix}/{k:05d}.tar")["ETag"] for k in clean}
        hits = server_stats(server)
        again = run(settings.replace(retry_failed=True))
        after = server_stats(server)

    assert (again.ok, again.failed, again.skipped) == (len(failed), 0, 30 - len(failed))
    assert {i for i in range(30) if after[entry_key(i)] != hits[entry_key(i)]} == failed
    stored = objects(s3, prefix)
    for k in range(3):  # each shard holds its range once; its lines say all ok
        assert tar_keys(stored[f"{k:05d}.tar"]) == set(range(10 * k, 10 * k + 10))
        lines = [json.loads(line) for line in stored[f"{k:05d}.jsonl"].splitlines()]
        assert sorted(r["index"] for r in lines) == list(range(10 * k, 10 * k + 10))
        assert {r["status"] for r in lines} == {"ok"}
    for k, etag in untouched.items():
        assert s3.info(f"{prefix}/{k:05d}.tar", refresh=True)["ETag"] == etag, "not rewritten"


# ---------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("backend", "case"), [("dask", "no bucket"), ("asyncio", "no endpoint"), ("threads", "files")]
)
def test_a_store_that_cannot_be_written_is_one_line_before_any_fetch(
    s3: s3fs.S3FileSystem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, case: str
) -> None:
    state = tmp_path / "state"
    url, fmt = "s3://no-such-bucket/x", "webdataset"
    if case == "no endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
        url = "s3://any-bucket/x"
    if case == "files":
        fmt = "files"
    with server_thread(make_app(ServerSettings())) as server:
        result = invoke(*cli_args(backend, server.base_url, Path("unused"), 5), "--out", url,
                        "--state", str(state), "--output-format", fmt)  # fmt: skip
        assert server_stats(server)["entries"] == 0, "nothing fetched"
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    expected = {
        "no bucket": f"error: cannot write to {url}: no bucket 'no-such-bucket' at http://127.0.0.1:",
        "no endpoint": f"error: cannot write to {url}: cannot reach the endpoint at http://127.0.0.1:9",
        "files": f"error: --out {url}: a URL takes the shard formats, --output-format webdataset",
    }[case]
    assert line.startswith(expected), line
    assert not state.exists(), "the state folder is not even made"


class Sabotage:
    """An observer that puts a file where the store's folder is once ``after`` results
    are recorded (the first shard committed), and can put the folder back."""

    def __init__(self, target: Path, after: int) -> None:
        self.target, self.after, self.seen = target, after, 0

    def start(self, to_run: int | None, kept: int) -> None:
        pass

    def result(self, result: object) -> None:
        self.seen += 1
        if self.seen == self.after:
            # A shard commits on a thread of its own: the first one is whole before the store goes.
            wait_for(lambda: (self.target / "00000.tar").is_file(), "the first shard")
            self.target.rename(self.target.with_name("moved"))
            self.target.write_text("not a folder")

    def restore(self) -> None:
        self.target.unlink()
        self.target.with_name("moved").rename(self.target)


def test_a_store_that_fails_mid_run_stops_it_and_resume_completes_it(tmp_path: Path) -> None:
    target, state = tmp_path / "store", tmp_path / "state"
    with server_thread(make_app(ServerSettings(seed=10))) as server:
        settings = shard_settings("asyncio", server.base_url, f"file://{target}", state, 30)
        sabotage = Sabotage(target, after=10)
        stopped = run(settings, observer=sabotage)
        assert stopped.fault is not None and stopped.interrupted
        assert stopped.fault.cause.startswith(f"cannot write file://{target}/00001"), stopped.fault
        assert (
            stopped.fault.then("x")
            == f"{stopped.fault.cause}: make the store reachable and writable, then x"
        )
        sabotage.restore()
        resumed = run(settings.replace(resume=True))
    assert (resumed.skipped, resumed.ok, resumed.failed) == (10, 20, 0)
    assert [tar_keys((target / f"{k:05d}.tar").read_bytes()) for k in range(3)] == [
        set(range(10 * k, 10 * k + 10)) for k in range(3)
    ]


def test_credentials_reach_no_message_no_manifest_no_object(
    s3: s3fs.S3FileSystem, bucket: str, endpoint: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = child_env(**aws_env(endpoint, tmp_path))
    with server_thread(make_app(ServerSettings(seed=8))) as server:
        args = [*cli_args("threads", server.base_url, Path("unused"), 12), "--state", str(state),
                "--output-format", "parquet", "--samples-per-shard", "5"]  # fmt: skip
        ok = run_cli([*args, "--out", f"s3://{bucket}/c"], tmp_path, env=env)
        refused = run_cli([*args, "--out", "s3://no-such-bucket/c"], tmp_path, env=env)
    assert ok.returncode == 0 and refused.returncode == 2, (ok.stderr, refused.stderr)
    seen = [ok.stdout, ok.stderr, refused.stdout, refused.stderr]
    seen += [p.read_bytes().decode("latin-1") for p in state.rglob("*") if p.is_file()]
    seen += [data.decode("latin-1") for data in objects(s3, f"{bucket}/c").values()]
    assert len(seen) > 10
    for text in seen:
        assert KEY_ID not in text and SECRET not in text


def test_one_run_per_url_out(s3: s3fs.S3FileSystem, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/locked"
    first = FsspecStore(url, tmp_path / "a")
    with OutputLock(tmp_path / "a"), first.lock(tmp_path / "a"):
        assert json.loads(s3.cat_file(f"{bucket}/locked/{LOCK_OBJECT}"))["pid"] == os.getpid()
        second = FsspecStore(url, tmp_path / "b")
        with pytest.raises(OutputInUseError, match=f"in use by another download .*delete {url}/"):
            second.lock(tmp_path / "b").__enter__()
    assert not s3.exists(f"{bucket}/locked/{LOCK_OBJECT}"), "removed at the end"
    # A lock another host left: refused, with the way out; nothing fetched.
    s3.pipe_file(
        f"{bucket}/locked/{LOCK_OBJECT}", b'{"host": "elsewhere", "pid": 7, "state": "/x"}'
    )
    with server_thread(make_app(ServerSettings())) as server:
        result = invoke(*cli_args("asyncio", server.base_url, Path("unused"), 3), "--out", url,
                        "--state", str(tmp_path / "c"), "--output-format", "parquet")  # fmt: skip
        assert server_stats(server)["entries"] == 0
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {url} is in use by another download (pid 7 on elsewhere); if that run is "
        f"gone, delete {url}/{LOCK_OBJECT}"
    )


def test_a_service_job_names_a_url_out_only_under_an_allowed_prefix(tmp_path: Path) -> None:
    body = {"count": 3, "local": True, "out": "s3://data/jobs/run-1",
            "dataset": {"output_format": "webdataset"}}  # fmt: skip
    closed = Settings()
    with pytest.raises(ConfigError, match=r"^out is set by the service, not by a job$"):
        parse_body(body, closed)
    allowing = Settings(service=ServiceSettings(out_urls="s3://data/jobs"))
    for refused in ("s3://data/jobs-evil/x", "s3://data/jobs", "s3://other/jobs/x", "/tmp/x"):
        with pytest.raises(ConfigError):
            parse_body({**body, "out": refused}, allowing)
    spec = parse_body(body, allowing)
    settings = job_settings(spec.values, tmp_path / "job-1", None)
    assert (settings.store, settings.out) == ("s3://data/jobs/run-1", tmp_path / "job-1")
    assert settings.thumbnails.size == 0
    assert job_settings(parse_body({"count": 3}, allowing).values, tmp_path / "j", None).store == ""


def test_a_file_url_is_a_store_too(tmp_path: Path) -> None:
    target = tmp_path / "bucket"
    with server_thread(make_app(ServerSettings(seed=9))) as server:
        settings = shard_settings(
            "asyncio", server.base_url, f"file://{target}", tmp_path / "st", 12
        )
        assert run(settings).ok == 12
    names = sorted(p.name for p in target.iterdir())
    assert names == ["00000.jsonl", "00000.parquet", "00000.tar", "00000_stats.json",
                     "00001.jsonl", "00001.parquet", "00001.tar", "00001_stats.json"]  # fmt: skip
    assert tar_keys((target / "00001.tar").read_bytes()) == set(range(10, 12))
