"""The manifest: a run that fails to start keeps it, --retry-failed keeps a line for every
index, records that point outside OUT are not trusted, and a record round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ImageServer, by_index, invoke, make_settings, records

from downloader import ConfigError
from downloader.manifest import ManifestWriter, read_manifest
from downloader.pipeline import run
from downloader.result import Result
from downloader.storage import MANIFEST


def test_a_run_that_fails_to_start_keeps_the_previous_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"index": 0, "url": "http://h/0", "status": "ok"}\n')
    with pytest.raises(ConfigError), ManifestWriter(tmp_path):
        raise ConfigError("cannot reach the scheduler")
    assert list(read_manifest(tmp_path)) == [0]
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]


def test_retry_failed_without_the_first_count_keeps_every_line(tmp_path: Path) -> None:
    out = tmp_path / "pic"
    assert invoke("-n", "12", "--local", "--out", str(out), "-q").exit_code == 0
    code = invoke("--local", "--out", str(out), "-q", "--retry-failed").exit_code
    assert code == 0
    assert sorted(by_index(records(out))) == list(range(12))


def test_resume_ignores_records_that_point_outside_out(
    image_server: ImageServer, tmp_path: Path
) -> None:
    out = tmp_path / "pic"
    out.mkdir()
    (out / MANIFEST).write_text(
        json.dumps({"index": 0, "url": "x", "status": "ok", "path": "../../etc/hostname"})
        + "\n"
        + json.dumps({"index": 1, "url": 5, "status": "ok"})
        + "\n"
    )
    assert read_manifest(out) == {}
    settings = make_settings("sync", out, image_server.base + "/320/240?lock={i}", 2)
    assert run(settings.replace(resume=True)).ok == 2


def test_manifest_that_is_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "pic" / MANIFEST).mkdir(parents=True)
    result = invoke("-n", "1", "--local", "--out", str(tmp_path / "pic"), "-q")
    code, stderr = result.exit_code, result.stderr
    assert code == 2 and "manifest" in stderr and "Traceback" not in stderr


def test_result_from_record_round_trips() -> None:
    result = Result(index=3, url="http://h/3", status="ok", path="000003.jpg", bytes=5)
    assert Result.from_record(result.to_record()) == result
