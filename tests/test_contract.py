"""One contract suite, run against every backend on the built-in server (loopback)."""

from __future__ import annotations

import hashlib
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import (
    CASES,
    CONTRACT_BACKENDS,
    OK_CASES,
    OVERSIZE_CAP,
    ImageServer,
    decode_size,
    make_settings,
    records,
)

from downloader.lock import LOCK
from downloader.pipeline import run
from downloader.storage import MANIFEST, THUMBS

MANIFEST_KEYS = {
    "index", "url", "final_url", "status", "path", "thumbnail",
    "bytes", "sha256", "width", "height", "attempts", "elapsed_ms", "error",
}  # fmt: skip


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def served(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
        return data


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_happy_path(backend: str, image_server: ImageServer, tmp_path: Path) -> None:
    out = tmp_path / "pic"
    count = 12
    settings = make_settings(backend, out, image_server.base + "/{width}/{height}?lock={i}", count)
    report = run(settings)

    assert (report.ok, report.failed) == (count, 0)
    lines = records(out)
    assert sorted(line["index"] for line in lines) == list(range(count))
    for line in lines:
        assert set(line) == MANIFEST_KEYS
        assert line["status"] == "ok" and line["error"] is None
        data = (out / str(line["path"])).read_bytes()
        # Saved bytes are exactly what the server serves at the final URL.
        assert data == served(str(line["final_url"]))
        assert hashlib.sha256(data).hexdigest() == line["sha256"]
        assert line["bytes"] == len(data)
        assert (line["width"], line["height"]) == (320, 240)
        thumb = (out / str(line["thumbnail"])).read_bytes()
        assert max(decode_size(thumb)) == 64
    names = {p.name for p in files_under(out)}
    assert not any(n.endswith(".part") for n in names)
    assert len(list((out / THUMBS).iterdir())) == count


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_hostile_server(backend: str, image_server: ImageServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = root / "out"
    token = uuid.uuid4().hex
    url = f"{image_server.base}/t/{token}/case/{{i}}"
    settings = make_settings(backend, out, url, len(CASES), max_bytes=OVERSIZE_CAP)
    report = run(settings)

    lines = {int(str(line["index"])): line for line in records(out)}
    assert sorted(lines) == list(range(len(CASES)))  # exactly one line per index
    assert report.ok == len(OK_CASES) and report.failed == len(CASES) - len(OK_CASES)
    for index, case in enumerate(CASES):
        line = lines[index]
        if case in OK_CASES:
            assert line["status"] == "ok", (case, line["error"])
            assert (out / str(line["path"])).is_file()
        else:
            assert line["status"] == "failed", case
            assert line["path"] is None and line["error"], case
    reasons = {case: str(lines[i]["error"]) for i, case in enumerate(CASES)}
    assert "not an image" in reasons["html"]
    assert "not a valid image" in reasons["corrupt"]
    assert "bomb" in reasons["bomb"]
    assert "cap" in reasons["oversize"] and "cap" in reasons["oversize-chunked"]
    assert "404" in reasons["not-found"]
    assert "redirect" in reasons["redirect-loop"]
    assert "not a valid image" in reasons["truncated-jpeg"]
    assert lines[CASES.index("flaky")]["attempts"] == 2
    assert lines[CASES.index("not-found")]["attempts"] == 1  # 4xx is never retried

    # Nothing outside OUT; every file is a complete image or thumbnail.
    assert files_under(root) == files_under(out)
    images = [p for p in out.iterdir() if p.is_file() and p.name not in (MANIFEST, LOCK)]
    assert len(images) == len(OK_CASES)
    for path in images:
        assert len(path.name.encode()) <= 100 and not path.name.startswith(".")
        decode_size(path.read_bytes())
    # Two images with the same remote name are both kept, with their own bytes.
    a, b = (lines[CASES.index(c)] for c in ("same-name-a", "same-name-b"))
    assert a["path"] != b["path"] and a["sha256"] != b["sha256"]


@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_unreachable_host_is_a_failed_result(backend: str, tmp_path: Path) -> None:
    # Port 9 on loopback: connection refused, retried, then reported.
    settings = make_settings(backend, tmp_path / "pic", "http://127.0.0.1:9/{i}.jpg", 3)
    report = run(settings)
    assert (report.ok, report.failed) == (0, 3)
    assert all("connection failed" in str(r.error) for r in report.results)
    assert all(r.attempts == 3 for r in report.results)
    assert len(records(tmp_path / "pic")) == 3
