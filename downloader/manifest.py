"""The manifest, ``OUT/manifest.jsonl``: one JSON line per image, appended whole or not at
all, and read back (last valid line per index) for ``--resume`` and ``--retry-failed``."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from .errors import StorageError, StorageFault, StorageFaultError
from .result import Result
from .shardreader import committed_digests
from .shards import line_of
from .storage import (
    MANIFEST,
    is_component,
    is_thumbnail_path,
    sha256,
    storage_fault,
    temp_path,
)
from .stores import LocalStore, Store


def read_manifest(out: Path) -> dict[int, Result]:
    """The last valid record for each index; torn or invalid lines are ignored."""
    records: dict[int, Result] = {}
    path = out / MANIFEST
    if not path.exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            result = parse_line(line)
            if result is not None:
                records[result.index] = result
    return records


def parse_line(line: str) -> Result | None:
    """One manifest line's record, or None for a torn or invalid line (the one reader of
    manifest lines: ``--resume``'s and the service's)."""
    try:
        result = Result.from_record(json.loads(line))
    except (ValueError, TypeError, AttributeError):
        return None
    return result if _plausible(result) else None


def _plausible(result: Result) -> bool:
    """A record we may act on: right types, and paths that stay inside OUT (a manifest is
    input too: an edited one must not make --resume read ``../../etc``)."""
    if not isinstance(result.index, int) or not isinstance(result.url, str):
        return False
    if result.path is not None and not is_component(result.path):
        return False
    if result.thumbnail is not None and not is_thumbnail_path(result.thumbnail):
        return False
    if result.key is not None and not (isinstance(result.key, str) and result.key.isdigit()):
        return False
    return result.sha256 is None or isinstance(result.sha256, str)


def still_valid(out: Path, result: Result) -> bool:
    """An ok record whose file (and thumbnail) is on disk with the recorded sha256 (the
    saved file's, when it is not the downloaded bytes)."""
    if not result.ok or not result.path or not result.sha256:
        return False
    try:
        data = (out / result.path).read_bytes()
    except OSError:
        return False
    if sha256(data) != (result.saved_sha256 or result.sha256):
        return False
    return result.thumbnail is None or (out / result.thumbnail).is_file()


def intact_check(out: Path, store: Store | None = None) -> Callable[[Result], bool]:
    """``still_valid`` for a run's records, shard records included: an ok sample is
    intact when its shard is committed and holds its key with the record's sha256 (a
    shard is written whole, so its members are; the digest tells this run's image from
    an older run's under the same key; each shard is looked at once). ``store``: where the
    shards are, when not in ``out`` (a URL OUT)."""
    digests = functools.cache(functools.partial(committed_digests, store or LocalStore(out)))

    def intact(result: Result) -> bool:
        if result.key is None:
            return still_valid(out, result)
        if not result.ok or not result.path or not result.sha256:
            return False
        if digests(result.path).get(result.key) != result.sha256:
            return False
        return result.thumbnail is None or (out / result.thumbnail).is_file()

    return intact


def store_records(store: Store) -> dict[int, Result]:
    """The records a URL store keeps: the lines of each committed shard's ``NNNNN.jsonl``
    (for a run whose local manifest is gone, or was kept on another machine)."""
    names = store.names()
    records: dict[int, Result] = {}
    for name in sorted(names):
        stem, _, suffix = name.partition(".")
        if suffix != "jsonl" or not {f"{stem}.tar", f"{stem}.parquet"} & names:
            continue
        for line in (store.read_bytes(name) or b"").decode("utf-8", "replace").splitlines():
            result = parse_line(line)
            if result is not None and result.path in names:
                records[result.index] = result
    return records


class ManifestWriter:
    """Appends one JSON line per result, as it comes: a crash loses no line, and a reader
    (the service, ``tail -f``) sees each image as soon as it is recorded.

    A line lands whole or not at all: a write that fails part-way is cut back to the last
    complete line, the result's files are removed (``--resume`` fetches it again), and
    ``StorageFaultError`` says why; after that the writer records nothing more. The file
    is opened for each line (cheap: see benchmarks/README.md), never held open: a folder removed or
    made read-only mid-run is noticed at the next line, and nothing here keeps a file
    system from being remounted read-only."""

    def __init__(
        self, out: Path, keep: Iterable[Result] = (), stale: Iterable[Result] = ()
    ) -> None:
        # A fresh file holds the records we keep (resume), then the ``stale`` ones: the old
        # lines of indices this run fetches again. It is swapped in atomically with the
        # first result (or at a clean close): a run that fails to start (a Dask scheduler
        # that cannot be reached) leaves the previous manifest as it was. A stale line stays
        # until its index has a new line, so an interrupted re-run loses none; at close the
        # superseded ones are dropped (while the run lasts, the last line of an index wins).
        self._out = out
        self._path = out / MANIFEST
        if self._path.is_dir():
            raise StorageError(f"cannot write the manifest {self._path}: it is a folder")
        self._tmp: Path | None = temp_path(self._path)
        self._stale: dict[int, tuple[int, int]] = {}  # index -> byte range of its old line
        self._superseded: list[tuple[int, int]] = []
        self._fault: StorageFault | None = None
        self._closed = False
        try:
            with open(self._tmp, "wb") as fh:
                fh.writelines(line_of(result) for result in keep)
                for result in stale:
                    begin = fh.tell()
                    fh.write(line_of(result))
                    self._stale[result.index] = (begin, fh.tell())
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write the manifest {self._path}: {exc.strerror}") from None

    def write(self, result: Result) -> None:
        """Record ``result``, or remove its files and raise ``StorageFaultError``."""
        try:
            if self._fault is not None:
                raise StorageFaultError(self._fault)
            self._swap()
            self._append(line_of(result))
        except StorageFaultError as exc:
            discard(self._out, result)
            raise StorageFaultError(exc.fault, lost=(result,)) from None
        if result.index in self._stale:
            self._superseded.append(self._stale.pop(result.index))

    def fail(self, reason: StorageFault) -> None:
        """Stop recording (a storage fault elsewhere, e.g. writing an image): each later
        ``write`` removes the result's files and raises ``StorageFaultError``."""
        self._fault = self._fault or reason

    @property
    def fault(self) -> StorageFault | None:
        return self._fault

    def _swap(self) -> None:
        if self._tmp is None:
            return
        try:
            os.replace(self._tmp, self._path)
        except OSError as exc:
            self._fail(exc)
        self._tmp = None

    def _fail(self, exc: OSError) -> NoReturn:
        self._fault = storage_fault(exc, self._out) or StorageFault(
            f"cannot write the manifest {self._path}: {exc.strerror or exc}", "fix it"
        )
        raise StorageFaultError(self._fault)

    def close(self, commit: bool = True) -> None:
        """Swap the fresh file in if no result did yet (``commit``: a clean end), and drop
        the stale lines this run superseded. Never raises: a fresh file that cannot be
        swapped in holds no line the previous manifest lacks."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(StorageFaultError):
            if commit and self._fault is None:
                self._swap()
            self._compact()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)

    def _compact(self) -> None:
        """Copy the manifest without the stale lines this run superseded. Best effort, and
        tried after a storage fault too: if it cannot (a full disk), both lines stay, and
        the last one wins."""
        if not self._superseded:
            return
        tmp = temp_path(self._path)
        try:
            with open(self._path, "rb") as src, open(tmp, "wb") as dst:
                at = 0
                for begin, end in sorted(self._superseded):
                    dst.write(src.read(begin - at))
                    src.seek(end)
                    at = end
                shutil.copyfileobj(src, dst)
            os.replace(tmp, self._path)
        except OSError:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        self.close(commit=kind is None)

    def _append(self, line: bytes) -> None:
        """Append ``line`` whole: on a failed or short write, cut the file back to where
        it was, and fail the writer."""
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            self._fail(exc)
        try:
            size = os.fstat(fd).st_size
            done = 0
            while done < len(line):
                done += os.write(fd, line[done:])
        except OSError as exc:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.ftruncate(fd, size)
            self._fail(exc)
        finally:
            os.close(fd)


def discard(out: Path, result: Result) -> None:
    """Remove the files of a result that will not be recorded: no image may be on disk
    without its manifest line."""
    # A sample's path names its shard, which holds other images: only its thumbnail goes.
    for name in (None if result.key else result.path, result.thumbnail):
        if name:
            with contextlib.suppress(OSError):
                (out / name).unlink(missing_ok=True)
