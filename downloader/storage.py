"""Storage: safe names, atomic writes, the manifest, and what ``--resume`` may keep.

The one door for names is ``safe_name``: nothing a server says reaches the file system
without passing through it. Files are written to a hidden temp file in the same folder and
renamed with ``os.replace``, so a killed run leaves no partial image or thumbnail in OUT.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import string
import unicodedata
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiofiles.os

from .errors import ConfigError, StorageError, StorageFault

MANIFEST = "manifest.jsonl"
THUMBS = "thumbnails"
TEMP_SUFFIX = ".part"
MAX_STEM = 60  # bytes of the remote name we keep; the whole name stays under ~80 bytes
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(final_url: str) -> str:
    """The remote file name of ``final_url`` reduced to ``[A-Za-z0-9._-]``, no extension,
    no leading dots, at most ``MAX_STEM`` bytes; may be empty."""
    try:
        path = urlsplit(final_url).path
    except ValueError:
        path = ""
    # Decode twice so %252F is seen as "/" too; separators then split like real ones.
    name = unquote(unquote(path)).replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = _UNSAFE.sub("_", stem).strip("._-")
    return stem[:MAX_STEM].rstrip("._-")


NAME_FIELDS = ("index", "stem", "sha8", "sha256", "ext", "width", "height")
MAX_NAME = 100  # bytes


def check_name_template(template: str) -> None:
    """Reject a ``--name-template`` that names an unknown field, cannot be formatted, or
    could give two different images the same name."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"bad name template {template!r}: {exc}") from None
    unknown = fields - set(NAME_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown field {{{sorted(unknown)[0]}}} in name template; use "
            + ", ".join("{" + f + "}" for f in NAME_FIELDS)
        )
    try:
        template.format(
            index=1, stem="s", sha8="0" * 8, sha256="0" * 64, ext=".jpg", width=1, height=1
        )
    except (ValueError, IndexError, KeyError) as exc:
        raise ConfigError(f"bad name template {template!r}: {exc}") from None
    if not fields & {"index", "sha8", "sha256"}:
        raise ConfigError("name template needs {index}, {sha8} or {sha256} to keep names unique")


def safe_name(
    index: int,
    final_url: str,
    ext: str,
    *,
    sha: str = "",
    template: str = "",
    size: tuple[int, int] = (0, 0),
) -> str:
    """One safe path component, unique per job index: ``000042-remote_name.jpg``, or
    ``template`` filled in (see ``NAME_FIELDS``) and then made safe the same way.

    ``ext`` comes from the decoded image format, never from the server.
    """
    if not re.fullmatch(r"\.[a-z0-9]{1,5}", ext):
        raise ValueError(f"bad extension {ext!r}")
    stem = safe_stem(final_url)
    if not template:
        return f"{index:06d}-{stem}{ext}" if stem else f"{index:06d}{ext}"
    raw = template.format(
        index=index, stem=stem, sha8=sha[:8], sha256=sha, ext=ext, width=size[0], height=size[1]
    )
    wanted = raw.removesuffix(ext)
    base = _UNSAFE.sub("_", wanted.replace("/", "_").replace("\\", "_")).strip("._-")
    if base != wanted or len(base) > MAX_NAME - len(ext):
        # Making it safe changed the name, and may have cut away what made it unique
        # ({index:0>200} is 200 zeros before the index): the index keeps it unique.
        tag = f"-{index:06d}"
        base = base[: MAX_NAME - len(ext) - len(tag)].rstrip("._-") + tag
    return f"{base.lstrip('._-') or f'{index:06d}'}{ext}"


def is_component(name: object) -> bool:
    """Whether ``name`` is one plain file name in a folder: not empty, no separator, no
    NUL, not hidden (so never ``.`` or ``..``). What ``safe_name`` makes, and all that a
    manifest (which is input too) or a request may name."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not any(char in name for char in "/\\\0")
    )


def is_thumbnail_path(path: object) -> bool:
    """Whether ``path`` is ``thumbnails/<component>``, as ``thumbnail_name`` makes."""
    prefix = f"{THUMBS}/"
    return isinstance(path, str) and path.startswith(prefix) and is_component(path[len(prefix) :])


def thumbnail_name(image_name: str) -> str:
    return f"{THUMBS}/{image_name.rsplit('.', 1)[0]}.jpg"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_files(files: list[tuple[Path, bytes]]) -> None:
    """``write_atomic`` each (path, data) in order; a file already there with the same
    bytes (a re-run shard, a resumed run) is recognised and left alone. If one fails,
    those this call wrote are taken back out: a failed image leaves no thumbnail."""
    written: list[Path] = []
    try:
        for path, data in files:
            if not _same_content(path, data):
                write_atomic(path, data)
                written.append(path)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise


def _same_content(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):  # one stat: the common case stops here
            return False
        return path.read_bytes() == data
    except OSError:
        return False


# ``write_files`` off the event loop, through aiofiles' executor: one hop to the thread
# pool for all of an image's files, instead of one per open/write/close/rename: each hop
# costs CPU (figure in benchmarks/README.md, "Figures behind design choices").
write_files_async = aiofiles.os.wrap(write_files)


def prepare_out(out: Path) -> None:
    """Create OUT and OUT/thumbnails, prove they are writable, and sweep temp files a
    killed run left behind. Raises ``StorageError`` with a one-line reason."""
    check_writable(out)
    sweep_temps(out)


def check_writable(out: Path) -> None:
    """Create OUT and OUT/thumbnails and prove they are writable (safe to run in several
    processes at once: nothing here removes another's files)."""
    if out.exists() and not out.is_dir():
        raise StorageError(f"output folder {out} exists and is not a folder")
    try:
        (out / THUMBS).mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def sweep_temps(out: Path) -> None:
    """Remove the temp files of writes that never finished (a killed or interrupted run).

    ``os.scandir``, not ``Path.glob``: glob lists the whole folder at once (its peak memory
    grows with the folder, see benchmarks/README.md), scandir streams it."""
    for folder in (out, out / THUMBS):
        # Best effort: after a storage fault, OUT may be gone or read-only.
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        Path(entry.path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- faults

# errno -> (what happened, what the user does about it): faults that hit every later write.
_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "make it writable again"),
    errno.EIO: ("I/O error", "check the disk"),
    errno.EACCES: ("permission denied", "make it writable again"),
    errno.EPERM: ("permission denied", "make it writable again"),
}


def storage_fault(exc: OSError, out: Path) -> StorageFault | None:
    """The cause and the fix, when ``exc`` (raised writing under OUT) will hit every later
    image as well; None when it concerns this image only.

    Our names are fresh and safe, so a missing folder or a refused permission is about
    OUT itself, not about the image."""
    if exc.errno in _FAULTS:
        cause, fix = _FAULTS[exc.errno]
        return StorageFault(f"{cause} writing {out}", fix)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        gone = out if not out.is_dir() else out / THUMBS
        if not gone.is_dir():
            return StorageFault(f"the output folder {gone} was removed")
    return None
