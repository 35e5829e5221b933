"""loremflickr options, --unique, name templates and the Python API (URL lists: test_url_lists)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from helpers import ImageServer, child_env, invoke, jpeg, make_settings, records, server_stats
from PIL import Image

import downloader
from downloader import Settings, download
from downloader.cli import main
from downloader.errors import ConfigError
from downloader.jobs import Template
from downloader.pipeline import run
from downloader.server import make_app, server_thread
from downloader.settings import ServerSettings


@pytest.fixture(scope="module")
def small_pool() -> Iterator[str]:
    """A server with only 12 distinct photos per size, picked at random without ?lock=."""
    with server_thread(make_app(ServerSettings(seed=3, pool_size=12))) as server:
        yield server.base_url


# ---------------------------------------------------------------------------- loremflickr options


def test_template_composes_loremflickr_options() -> None:
    base = "https://loremflickr.com/{width}/{height}/{keywords}?lock={i}"
    plain = Template(base, 320, 240, "")
    assert plain.render(3) == "https://loremflickr.com/320/240?lock=3"
    full = Template(base, 640, 480, "cat,dog", gray=True, match="all")
    assert full.render(0) == "https://loremflickr.com/g/640/480/cat,dog/all?lock=0"
    with pytest.raises(ConfigError, match="--gray"):
        Template("https://h/img/{i}.jpg", 1, 1, "", gray=True)


def test_cli_size_gray_keywords_reach_the_server(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "--local",
            "-n",
            "2",
            "--size",
            "200x100",
            "--gray",
            "--keywords",
            "cat",
            "--match",
            "any",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output + result.stderr
    lines = records(out)
    assert sorted(int(str(line["index"])) for line in lines) == [0, 1]
    for line in lines:
        assert line["status"] == "ok"
        assert "/g/200/100/cat/any?lock=" in str(line["url"])
        with Image.open(out / str(line["path"])) as img:
            assert img.size == (200, 100) and img.mode == "L"


# ---------------------------------------------------------------------------- --unique


@pytest.mark.parametrize("backend", ["asyncio", "threads"])
def test_unique_fetches_until_n_distinct_images(
    small_pool: str, tmp_path: Path, backend: str
) -> None:
    out = tmp_path / "out"
    settings = make_settings(backend, out, small_pool + "/320/240", 8).replace(unique=True)
    report = run(settings)
    images = [p for p in out.iterdir() if p.suffix == ".jpg"]
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    assert report.unique == 8 and len(images) == 8 and len(digests) == 8
    recorded = records(out)
    assert len({r["index"] for r in recorded}) == len(recorded)  # one line per index
    assert sum(r["status"] == "ok" for r in recorded) == 8
    assert all("duplicate of image #" in str(r["error"]) for r in recorded if r["status"] != "ok")
    assert len(list((out / "thumbnails").iterdir())) == 8


def test_unique_gives_up_with_a_clear_message(small_pool: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["-n", "15", "--unique", "--url", small_pool + "/320/240", "--out", str(out), "-q"],
    )
    assert result.exit_code == 1
    assert "gave up: 12 distinct images of 15 wanted" in result.stderr
    assert len([p for p in out.iterdir() if p.suffix == ".jpg"]) == 12
    assert len(records(out)) <= 15 + 2 * 15 + 20  # bounded extra attempts


def test_unique_with_index_template_uses_new_indices(small_pool: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # lock=i mod 12 on the server: indices 0..9 are distinct, and so are any 10 of 0..11.
    settings = make_settings("sync", out, small_pool + "/320/240?lock={i}", 10).replace(unique=True)
    assert run(settings).unique == 10


def ok_digests(out: Path) -> list[str]:
    """The sha256 of every ok record, after checking its file has that content."""
    digests = []
    for record in records(out):
        if record["status"] == "ok":
            data = (out / str(record["path"])).read_bytes()
            assert hashlib.sha256(data).hexdigest() == record["sha256"]
            digests.append(str(record["sha256"]))
    return digests


def test_unique_resume_fetches_only_the_missing_images(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with server_thread(make_app(ServerSettings(seed=3, pool_size=12))) as server:
        args = ["-n", "8", "--unique", "--url", server.base_url + "/320/240?lock={i}"]
        args += ["--out", str(out), "-q"]
        assert CliRunner().invoke(main, args).exit_code == 0
        by_index = {int(str(r["index"])): r for r in records(out)}
        for index in (2, 5):
            (out / str(by_index[index]["path"])).unlink()
        before = server_stats(server.base_url)
        result = CliRunner().invoke(main, [*args, "--resume"])
        fetched = server_stats(server.base_url) - before

    assert result.exit_code == 0, result.output + result.stderr
    assert "6 kept" in result.stdout
    entries = {key: n for key, n in fetched.items() if key.startswith("/320/240")}
    assert entries == {"/320/240?lock=2": 1, "/320/240?lock=5": 1}
    digests = ok_digests(out)
    assert len(digests) == len(set(digests)) == 8
    assert sorted(int(str(r["index"])) for r in records(out)) == list(range(8))


def test_unique_resume_counts_the_distinct_images_already_kept(
    small_pool: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["-n", "10", "--unique", "--url", small_pool + "/320/240", "--out", str(out), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    kept = [r for r in records(out) if r["status"] == "ok"]
    for record in kept[:3]:
        (out / str(record["path"])).unlink()
    untouched = {str(r["path"]): (out / str(r["path"])).stat().st_mtime_ns for r in kept[3:]}

    result = CliRunner().invoke(main, [*args, "--resume"])

    assert result.exit_code == 0, result.output + result.stderr
    assert "7 kept" in result.stdout
    digests = ok_digests(out)
    assert len(digests) == len(set(digests)) == 10
    images = [p for p in out.iterdir() if p.suffix == ".jpg"]
    assert len(images) == 10
    assert {p: (out / p).stat().st_mtime_ns for p in untouched} == untouched
    recorded = records(out)
    assert len({r["index"] for r in recorded}) == len(recorded)  # one line per index
    assert all("duplicate of image #" in str(r["error"]) for r in recorded if r["status"] != "ok")


def test_unique_retry_failed_refetches_only_the_failed(tmp_path: Path) -> None:
    """A URL list: odd entries fail until healed, the last repeats the first (a duplicate).
    --retry-failed fetches the failed ones again, neither the kept ones nor the duplicate."""
    healed = False
    hits: Counter[int] = Counter()
    app = make_app(ServerSettings(seed=1))

    async def flip(request: web.Request) -> web.Response:
        index = int(request.match_info["i"])
        hits[index] += 1
        if index % 2 and not healed:
            raise web.HTTPNotFound(text="not yet")
        return web.Response(body=jpeg(index), content_type="image/jpeg")

    app.router.add_get("/flip/{i}", flip)
    out = tmp_path / "out"
    with server_thread(app) as server:
        listing = tmp_path / "urls.txt"
        urls = [f"{server.base_url}/flip/{i}" for i in (*range(6), 0)]
        listing.write_text("\n".join(urls) + "\n")
        # One at a time: which of two equal images counts as the first must not be a race.
        args = ["--urls", str(listing), "--unique", "--retries", "0", "--concurrency", "1"]
        args += ["--out", str(out), "-q"]
        assert CliRunner().invoke(main, args).exit_code == 1
        healed = True
        result = CliRunner().invoke(main, [*args, "--retry-failed"])

    assert result.exit_code == 0, result.output + result.stderr
    # /flip/0: index 0, and index 6 (its duplicate) in the first run only.
    assert hits == {0: 2, 1: 2, 2: 1, 3: 2, 4: 1, 5: 2}
    by_index = {int(str(r["index"])): r for r in records(out)}
    assert sorted(by_index) == list(range(7))
    assert sorted(i for i, r in by_index.items() if r["status"] == "ok") == list(range(6))
    assert "duplicate of image #0" in str(by_index[6]["error"])
    assert len(set(ok_digests(out))) == 6


def test_unique_url_list_all_distinct_exits_zero(image_server: ImageServer, tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{image_server.base}/320/240?lock={i}\n" for i in range(3)))
    code = invoke("--urls", str(listing), "--unique", "--out", str(tmp_path / "p"), "-q").exit_code
    assert code == 0


# ---------------------------------------------------------------------------- names


def test_name_template(image_server: ImageServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    settings = make_settings("sync", out, image_server.base + "/320/240?lock={i}", 3)
    report = run(settings.replace(name_template="{index:05d}-{sha8}-{width}x{height}{ext}"))
    assert (report.ok, report.failed) == (3, 0)
    lines = records(out)
    assert sorted(int(str(line["index"])) for line in lines) == [0, 1, 2]
    for line in lines:
        sha = str(line["sha256"])
        assert (out / str(line["path"])).is_file()
        assert line["path"] == f"{int(str(line['index'])):05d}-{sha[:8]}-320x240.jpg"


def test_hostile_name_template_stays_inside_out(image_server: ImageServer, tmp_path: Path) -> None:
    out = tmp_path / "root" / "out"
    settings = make_settings("sync", out, image_server.base + "/320/240?lock={i}", 2)
    report = run(settings.replace(name_template="../../{index}/..\\{stem}"))
    assert (report.ok, report.failed) == (2, 0)
    files = {p for p in (tmp_path / "root").rglob("*") if p.is_file()}
    assert all(out in p.parents for p in files)
    saved = {out / str(r.path) for r in report.results}
    assert len(saved) == 2 and saved <= files
    for line in records(out):
        assert "/" not in str(line["path"]) and not str(line["path"]).startswith(".")


@pytest.mark.parametrize(
    "template, message",
    [("{nope}{ext}", "unknown field"), ("{stem}{ext}", "unique"), ("{index", "bad name")],
)
def test_bad_name_templates_are_config_errors(template: str, message: str) -> None:
    result = CliRunner().invoke(main, ["--name-template", template, "-n", "1"])
    assert result.exit_code == 2 and message in result.stderr


def test_name_template_that_loses_uniqueness_still_keeps_every_image(
    image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    settings = make_settings("sync", out, image_server.base + "/320/240?lock={i}", 3)
    report = run(settings.replace(name_template="{index:0>200}{ext}"))
    paths = {r.path for r in report.results}
    assert len(paths) == 3 and all(len(str(p)) <= 100 for p in paths)
    assert len([p for p in out.iterdir() if p.suffix == ".jpg"]) == 3


# ---------------------------------------------------------------------------- Python API


def test_python_api(tmp_path: Path) -> None:
    report = download(Settings(count=3, local=True, out=tmp_path / "pic", progress=False))
    assert report.ok == 3 and len(report.results) == 3
    for result in report.results:
        assert result.ok and (tmp_path / "pic" / str(result.path)).is_file()
    again = download(count=2, local=True, out=tmp_path / "two", progress=False, backend="sync")
    assert again.ok == 2 and again.backend == "sync"


def test_python_api_rejects_wrong_types_with_config_error() -> None:
    with pytest.raises(ConfigError, match="count must be an integer"):
        download(count="2", progress=False)  # type: ignore[arg-type]


def test_public_api_is_exported() -> None:
    """``__all__`` lists exactly the package's own classes and functions that __init__
    makes public: one imported there but left out of ``__all__`` (or listed but missing)
    fails here."""
    own = {
        name
        for name, value in vars(downloader).items()
        if not name.startswith("_")
        and (isinstance(value, type) or callable(value))
        and getattr(value, "__module__", "").startswith("downloader")
    }
    assert set(downloader.__all__) == own
    assert {"download", "Settings", "Report", "Result", "ConfigError"} <= own


def test_thumbnail_is_a_decodable_jpeg(image_server: ImageServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(make_settings("asyncio", out, image_server.base + "/640/480?lock={i}", 1))
    thumb = (out / str(records(out)[0]["thumbnail"])).read_bytes()
    with Image.open(io.BytesIO(thumb)) as img:
        assert img.format == "JPEG" and img.size == (64, 48)


# Runs the CLI, then says on stdout whether rich was ever imported.
_CLI_THEN_MODULES = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('rich loaded:', 'rich' in sys.modules))\n"
    "from downloader.cli import main\n"
    "sys.argv[0] = 'download'\n"
    "main()\n"
)


@pytest.mark.parametrize("quiet", [True, False])
def test_a_long_failure_line_stays_one_line_in_a_log(
    image_server: ImageServer, tmp_path: Path, quiet: bool
) -> None:
    """Written to a pipe (a log file, CI), each failure line is one line whatever its length,
    so it can be grepped; and with -q, rich (a sizeable part of start-up) is not imported."""
    long = "x" * 300
    args = ["-n", "3", "--backend", "sync", "--url", f"{image_server.base}/no/{long}/{{i}}"]
    args += ["--out", str(tmp_path / "pic"), *(["-q"] if quiet else [])]
    done = subprocess.run(
        [sys.executable, "-c", _CLI_THEN_MODULES, *args],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    failures = [line for line in done.stderr.splitlines() if line.startswith("failed #")]
    assert len(failures) == 3
    for line in failures:
        assert f"/no/{long}/" in line and line.startswith("failed #") and "HTTP 404" in line
    assert all(line.startswith("failed #") for line in done.stderr.splitlines())
    if quiet:
        assert "rich loaded: False" in done.stdout
