"""What a run left on disk: its manifest, read line by line, and assertions on its files."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from downloader.storage import MANIFEST, TEMP_SUFFIX


def manifest_text(out: Path) -> str:
    path = out / MANIFEST
    return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""


def complete_lines(out: Path) -> list[str]:
    """Manifest lines that end with a newline; a torn last line (kill -9) is left out."""
    return manifest_text(out).split("\n")[:-1]


def records(out: Path) -> list[dict[str, Any]]:
    """Every complete manifest line, parsed: each one must be valid JSON."""
    parsed = []
    for line in complete_lines(out):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"manifest line is not valid JSON: {line!r}")
    return parsed


def by_index(lines: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Manifest records keyed by index; two lines for one index fail the test."""
    indices = [line["index"] for line in lines]
    assert len(indices) == len(set(indices)), f"duplicate manifest lines: {sorted(indices)}"
    return {line["index"]: line for line in lines}


def visible_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]


def assert_no_temp_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert leftovers == []


def assert_visible_images_decode(out: Path) -> None:
    """A killed run may leave hidden temp files, never a partial image under its real name."""
    for path in visible_files(out):
        if path.name == MANIFEST:
            continue
        assert not path.name.endswith(TEMP_SUFFIX), path
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()  # raises on a truncated or corrupt file


def assert_ok_files_match(out: Path, lines: dict[int, dict[str, Any]]) -> None:
    for index, line in lines.items():
        if line["status"] != "ok":
            continue
        data = (out / line["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"], index
        assert len(data) == line["bytes"], index
        if line["thumbnail"] is not None:
            assert (out / line["thumbnail"]).is_file(), index


def settled_lines(out: Path) -> dict[int, dict[str, Any]]:
    """The manifest of a run that ended (finished or stopped, not killed), by index: its last
    line is whole, and no temp file is left."""
    assert manifest_text(out).endswith("\n")  # no torn line
    assert_no_temp_files(out)
    return by_index(records(out))


def assert_files_whole(out: Path, lines: dict[int, dict[str, Any]]) -> None:
    """Every visible image decodes, and each ``ok`` line's file is the one it describes."""
    assert_visible_images_decode(out)
    assert_ok_files_match(out, lines)
