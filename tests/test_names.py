"""Safe names under hostile input (hypothesis), atomic writes, and a torn manifest."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from downloader import storage
from downloader.manifest import ManifestWriter, read_manifest
from downloader.result import Result
from downloader.storage import (
    MANIFEST,
    MAX_STEM,
    TEMP_SUFFIX,
    safe_name,
    safe_stem,
    write_atomic,
)

SAFE = re.compile(r"[A-Za-z0-9._-]*")
MAX_NAME_BYTES = 100

HOSTILE = [
    "..",
    ".",
    "../../etc/passwd",
    "..%2F..%2Fx.jpg",
    "..%252F..%252Fx.jpg",
    "%2e%2e%2f%2e%2e%2fx.jpg",
    "..\\..\\x.jpg",
    "a\\b\\..\\..\\c.png",
    "x\x00y.jpg",
    "%00.jpg",
    "\x01\x02\x1f\x7f.jpg",
    "n" * 300 + ".jpg",
    "é" * 300 + ".jpg",
    "\u202e" + "gpj.exe",
    "日本語の写真.jpg",
    "",
    "/",
    "//",
    ".hidden",
    "...",
    ".jpg",
    "-rf",
    "con.jpg",
    "a b c.jpg",
    "%",
    "%zz",
    "?q=1",
    "#frag",
]

exts = st.one_of(
    st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp"]),
    st.from_regex(r"\.[a-z0-9]{1,5}", fullmatch=True),
)
indices = st.integers(min_value=0, max_value=10**9)
hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=400),
    st.text(alphabet=st.sampled_from("./\\%2F5Cx.\x00\n é"), max_size=60),
    st.lists(st.sampled_from(["..", ".", "%2F", "%252F", "%5C", "\\", "/", "a", "jpg"])).map(
        "".join
    ),
)
urls = st.one_of(
    hostile_text.map(lambda text: f"http://h/cache/{text}"),
    hostile_text.map(lambda text: f"https://example.test/{text}?lock=1"),
    hostile_text,  # not even a URL
)


def assert_single_safe_component(name: str, tmp_path: Path) -> None:
    assert name
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert SAFE.fullmatch(name), name
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert Path(name).name == name
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


@settings(max_examples=300, deadline=None)
@given(index=indices, url=urls, ext=exts)
@example(index=0, url="http://h/cache/..%2F..%2Fx.jpg", ext=".jpg")
@example(index=1, url="http://h/cache/..%252F..%252F", ext=".jpg")
@example(index=2, url="http://h/cache/" + "n" * 300, ext=".png")
@example(index=3, url="http://h/cache/..\\..\\", ext=".gif")
@example(index=4, url="http://h/cache/\x00", ext=".jpg")
@example(index=5, url="http://[::1", ext=".jpg")  # urlsplit raises ValueError
@example(index=6, url="", ext=".jpg")
def test_safe_name_is_one_safe_component(
    index: int, url: str, ext: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    name = safe_name(index, url, ext)
    assert_single_safe_component(name, tmp_path_factory.getbasetemp())
    assert name.endswith(ext)
    assert name.startswith(f"{index:06d}")
    # The index is followed by the extension or a separator, never by more digits.
    rest = name[len(f"{index:06d}") :]
    assert rest == ext or rest.startswith("-")


@settings(max_examples=300, deadline=None)
@given(url=urls)
@example(url="http://h/cache/..")
@example(url="http://h/cache/%2e%2e")
@example(url="http://h/cache/" + "é" * 300)
def test_safe_stem_is_safe(url: str) -> None:
    stem = safe_stem(url)
    assert SAFE.fullmatch(stem), stem
    assert len(stem.encode("utf-8")) <= MAX_STEM
    assert "/" not in stem
    assert "\\" not in stem
    assert not stem.startswith(".")
    assert stem not in (".", "..")


@settings(max_examples=200, deadline=None)
@given(index=indices, ext=exts, text=hostile_text)
def test_name_is_unique_per_index(index: int, ext: str, text: str) -> None:
    url = f"http://h/cache/{text}"
    assert safe_name(index, url, ext) != safe_name(index + 1, url, ext)


@given(stem=st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,40}[A-Za-z0-9])?", fullmatch=True))
def test_plain_names_are_kept(stem: str) -> None:
    assert safe_stem(f"http://h/a/{stem}.jpg") == stem
    assert safe_name(7, f"http://h/a/{stem}.jpg", ".jpg") == f"000007-{stem}.jpg"


def test_traversal_redirect_name(tmp_path: Path) -> None:
    name = safe_name(1, "http://h/t/x/files/..%2F..%2Fx.jpg", ".jpg")
    assert name == "000001-x.jpg"
    assert_single_safe_component(name, tmp_path)


def test_double_encoded_traversal_name(tmp_path: Path) -> None:
    name = safe_name(1, "http://h/files/..%252F..%252Fetc%252Fpasswd", ".jpg")
    assert name == "000001-passwd.jpg"
    assert_single_safe_component(name, tmp_path)


def test_backslash_traversal_name(tmp_path: Path) -> None:
    # Backslashes split like slashes: only the last segment is the remote name.
    name = safe_name(2, "http://h/files/dir\\..\\..\\evil.png", ".png")
    assert name == "000002-evil.png"
    assert_single_safe_component(name, tmp_path)


def test_long_name_is_truncated(tmp_path: Path) -> None:
    name = safe_name(4, "http://h/files/" + "n" * 300 + ".jpg", ".jpg")
    assert name == "000004-" + "n" * MAX_STEM + ".jpg"
    assert_single_safe_component(name, tmp_path)


@pytest.mark.parametrize("url", ["http://h/", "http://h/..", "http://h/%2F", "http://h/...", ""])
def test_empty_stem_gives_index_only(url: str) -> None:
    assert safe_stem(url) == ""
    assert safe_name(9, url, ".jpg") == "000009.jpg"


def test_same_remote_name_different_indices() -> None:
    a = safe_name(2, "http://h/a/photo.jpg", ".jpg")
    b = safe_name(3, "http://h/b/photo.jpg", ".jpg")
    assert a != b
    assert a == "000002-photo.jpg"
    assert b == "000003-photo.jpg"


def test_extension_comes_from_caller_not_server() -> None:
    assert safe_name(0, "http://h/evil.php", ".jpg") == "000000-evil.jpg"


@pytest.mark.parametrize("ext", ["", "jpg", ".JPG", "./x", "/.jpg", ".jpg/", ".toolong", ". "])
def test_bad_extension_is_refused(ext: str) -> None:
    with pytest.raises(ValueError):
        safe_name(0, "http://h/x.jpg", ext)


# ---------------------------------------------------------------------------- atomic writes


def test_write_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "000001-x.jpg"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_write_atomic_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "000001-x.jpg"

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "000001-x.jpg"
    write_atomic(target, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_temp_path_is_hidden_and_swept_pattern(tmp_path: Path) -> None:
    tmp = storage.temp_path(tmp_path / "000001-x.jpg")
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".")
    assert tmp.name.endswith(TEMP_SUFFIX)


# ---------------------------------------------------------------------------- manifest


def record(index: int, **changes: object) -> dict[str, object]:
    base = Result(index=index, url=f"http://h/{index}", status="ok", path=f"{index:06d}.jpg")
    return {**base.to_record(), **changes}


def test_read_manifest_ignores_torn_and_junk_lines(tmp_path: Path) -> None:
    good = [record(0), record(1), record(2, status="failed", error="HTTP 404")]
    lines = [json.dumps(r) for r in good]
    junk = [
        "",
        "not json at all",
        "[1, 2, 3]",
        "42",
        "null",
        '"a string"',
        '{"index": 5}',  # missing required fields
        '{"index": "6", "url": "u", "status": "ok"}',  # index is not an int
    ]
    torn = json.dumps(record(3))[:25]  # a killed run's half-written last line
    text = "\n".join(lines[:1] + junk + lines[1:]) + "\n" + torn
    path = tmp_path / MANIFEST
    path.write_bytes(text.encode("utf-8") + b"\xff\xfe")  # and some non-UTF-8 bytes

    records = read_manifest(tmp_path)
    assert sorted(records) == [0, 1, 2]
    assert records[0] == Result(**good[0])  # type: ignore[arg-type]
    assert records[2].error == "HTTP 404"
    assert 3 not in records


def test_read_manifest_last_record_wins(tmp_path: Path) -> None:
    lines = [record(0, status="failed", error="boom"), record(0), record(1)]
    (tmp_path / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in lines), "utf-8")
    records = read_manifest(tmp_path)
    assert records[0].ok
    assert sorted(records) == [0, 1]


def test_read_manifest_missing_file(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) == {}


def test_read_manifest_ignores_unknown_fields(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps(record(4, future_field=1)) + "\n", "utf-8")
    assert list(read_manifest(tmp_path)) == [4]


def test_manifest_writer_round_trip(tmp_path: Path) -> None:
    results = [Result(**record(i)) for i in range(3)]  # type: ignore[arg-type]
    with ManifestWriter(tmp_path, keep=iter(results[:1])) as writer:
        for result in results[1:]:
            writer.write(result)
    assert read_manifest(tmp_path) == dict(enumerate(results))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert os.path.getsize(tmp_path / MANIFEST) > 0
