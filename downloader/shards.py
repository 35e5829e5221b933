"""Dataset shards: webdataset tars and parquet files, each complete under its final name
or not there at all.

Shard k holds input rows k*S ... (k+1)*S-1 (S = ``--samples-per-shard``), as img2dataset
assigns them, so every backend and every resumed run agrees where an image goes. A shard's
samples are streamed, in the order they finish, to a hidden temp file (memory: only its
metadata rows, a few hundred bytes each); when every row of its range has a result the
shard commits: its ``NNNNN_stats.json`` and metadata ``NNNNN.parquet`` first, then the
shard itself, each written to a temp name, fsynced and renamed. The shard's rename is the
commit: a reader never sees a torn shard, and after ``kill -9`` every shard on disk is
whole. A resumed run that adds to a committed shard rewrites it: the samples it keeps are
copied from the old shard into the new one, which replaces it in one rename.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import StorageFault
from .result import Result
from .storage import storage_fault, temp_path

SHARD_FORMATS = ("webdataset", "parquet")
KEY_DIGITS = 9
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
_ROW_GROUP = 256  # parquet rows per row group: bounded memory while committing


def key_of(index: int) -> str:
    """The sample key of input row ``index``: unique over the dataset, stable on resume."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(shard: int, fmt: str) -> str:
    return f"{shard:05d}{_SUFFIX[fmt]}"


def status_of(result: Result) -> str:
    """img2dataset's words, so downstream tools read our metadata unchanged."""
    if result.ok:
        return "success"
    return "failed_to_resize" if result.stage == "resize" else "failed_to_download"


def metadata_row(result: Result, caption: bool) -> dict[str, Any]:
    """The metadata of one input row: its columns, then ours."""
    row: dict[str, Any] = {"url": result.url}
    if caption:
        row["caption"] = result.caption
    row.update(result.columns or {})
    row.update(
        key=result.key or key_of(result.index),
        status=status_of(result),
        error_message=result.error,
        width=result.width,
        height=result.height,
        original_width=result.original_width,
        original_height=result.original_height,
        sha256=result.sha256,
    )
    return row


def shard_fault(exc: OSError, out: Path) -> StorageFault:
    """A shard that cannot be written stops the run: the rows of its range are in no
    committed shard, so going on would only fetch what --resume fetches again."""
    fault = storage_fault(exc, out)
    return fault or StorageFault(f"cannot write a shard in {out}: {exc.strerror or exc}", "fix it")


def need_pyarrow() -> Any:
    from .extras import need

    need("pyarrow.parquet", "dataset", "webdataset and parquet output")
    import pyarrow

    return pyarrow


def fsync_replace(tmp: Path, path: Path) -> None:
    """``os.replace`` after the data is on disk, then the folder's entry too."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _Stats:
    start: float = field(default_factory=time.time)
    count: int = 0
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # status -> count
    reasons: dict[str, int] = field(default_factory=dict)  # error message -> count

    def add(self, row: Mapping[str, Any]) -> None:
        self.count += 1
        if row["status"] == "success":
            self.successes += 1
            return
        self.failures[row["status"]] = self.failures.get(row["status"], 0) + 1
        reason = _reason(row.get("error_message"))
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def to_json(self) -> bytes:
        end = time.time()
        return json.dumps(
            {
                "count": self.count,
                "successes": self.successes,
                "failed_to_download": self.failures.get("failed_to_download", 0),
                "failed_to_resize": self.failures.get("failed_to_resize", 0),
                "failures_by_reason": dict(sorted(self.reasons.items())),
                "start_time": self.start,
                "end_time": end,
                "duration": round(end - self.start, 3),
            },
            indent=1,
        ).encode()


def _reason(message: Any) -> str:
    text = str(message or "unknown")
    return text.split(": ", 1)[0][:80]  # "HTTP 404: https://..." -> "HTTP 404"


class ShardWriter:
    """One open shard: samples streamed to a temp file, committed whole by ``commit``."""

    def __init__(self, out: Path, shard: int, fmt: str, caption: bool) -> None:
        self.path = out / shard_name(shard, fmt)
        self.fmt = fmt
        self.caption = caption
        self.rows: list[dict[str, Any]] = []
        self.stats = _Stats()
        self._tmp = temp_path(self.path)
        # Both stay open until commit or abort, across many add() calls.
        self._spool: IO[bytes] = open(self._tmp, "wb")  # noqa: SIM115
        self._tar = (
            tarfile.open(fileobj=self._spool, mode="w")  # noqa: SIM115
            if fmt == "webdataset"
            else None
        )
        self._where: list[tuple[int, int]] = []  # parquet: (offset, length) in the spool
        self._ext = ".jpg"

    def add(self, result: Result, data: bytes | None, ext: str = ".jpg") -> None:
        """Record one row; ``data`` is its image (None for a failed row)."""
        self.add_row(metadata_row(result, self.caption), data, ext)

    def add_row(self, row: dict[str, Any], data: bytes | None, ext: str = ".jpg") -> None:
        """Record one metadata row, and its image when it has one."""
        if data is not None:
            self._ext = ext
            if self._tar is not None:
                self._add_members(row, data, ext)
            else:
                self._where.append((self._spool.tell(), len(data)))
                self._spool.write(data)
        elif self._tar is None:
            self._where.append((0, -1))
        self.rows.append(row)
        self.stats.add(row)

    def _add_members(self, row: dict[str, Any], data: bytes, ext: str) -> None:
        assert self._tar is not None
        key = row["key"]
        members = [(f"{key}{ext}", data)]
        if self.caption:
            members.append((f"{key}.txt", str(row.get("caption") or "").encode()))
        members.append((f"{key}.json", json.dumps(row, default=str).encode()))
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), int(time.time()), 0o644
            self._tar.addfile(info, io.BytesIO(blob))

    def seed(self, keep: Callable[[int], bool]) -> None:
        """Copy from the committed shard this one replaces the rows whose index ``keep``
        says this run does not fetch again (their samples too)."""
        if not self.path.is_file():
            return
        for row, data, ext in read_shard(self.path):
            key = str(row.get("key", ""))
            if key.isdigit() and keep(int(key)):
                self.add_row(row, data, ext)

    def commit(self) -> None:
        """Write the stats, the metadata and the shard, each whole; the shard last."""
        out = self.path.parent
        stem = self.path.name.split(".")[0]
        _write_whole(out / f"{stem}_stats.json", self.stats.to_json())
        if self._tar is not None:
            self._tar.close()
            self._spool.close()
            _write_parquet(out / f"{stem}.parquet", self.rows, None, None)
            fsync_replace(self._tmp, self.path)
            return
        self._spool.close()
        ext = self._ext.lstrip(".")
        with open(self._tmp, "rb") as spool:
            _write_parquet(self.path, self.rows, (ext, self._where), spool)
        self._tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._tar is not None:
                self._tar.close()
        with contextlib.suppress(OSError):
            self._spool.close()
        self._tmp.unlink(missing_ok=True)


def _write_whole(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_parquet(
    path: Path,
    rows: list[dict[str, Any]],
    images: tuple[str, list[tuple[int, int]]] | None,
    spool: IO[bytes] | None,
) -> None:
    """The metadata ``rows`` (and, for the parquet format, each row's image read back
    from ``spool`` in a binary column named after its format) as one parquet file."""
    pa = need_pyarrow()
    import pyarrow.parquet as pq

    schema = _schema(pa, rows)
    if images is not None:
        schema = schema.append(pa.field(images[0], pa.binary()))
    tmp = temp_path(path)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, max(len(rows), 1), _ROW_GROUP):
                chunk = rows[start : start + _ROW_GROUP]
                columns = {name: [r.get(name) for r in chunk] for name in schema.names}
                if images is not None and spool is not None:
                    columns[images[0]] = [
                        _read(spool, *at) for at in images[1][start : start + _ROW_GROUP]
                    ]
                writer.write_table(pa.table(columns, schema=schema))
        fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _schema(pa: Any, rows: list[dict[str, Any]]) -> Any:
    """The metadata schema: types inferred over every row (a column that is None in the
    first rows still gets its type), ours fixed."""
    fixed = {
        "url": pa.string(), "caption": pa.string(), "key": pa.string(),
        "status": pa.string(), "error_message": pa.string(), "width": pa.int64(),
        "height": pa.int64(), "original_width": pa.int64(), "original_height": pa.int64(),
        "sha256": pa.string(),
    }  # fmt: skip
    names = list(rows[0]) if rows else list(fixed)
    inferred = (
        pa.Table.from_pylist([{k: v for k, v in r.items() if k not in fixed} for r in rows]).schema
        if rows
        else pa.schema([])
    )
    fields = []
    for name in names:
        if name in fixed:
            fields.append(pa.field(name, fixed[name]))
        else:
            kind = inferred.field(name).type if name in inferred.names else pa.null()
            fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def _read(spool: IO[bytes], offset: int, length: int) -> bytes | None:
    if length < 0:
        return None
    spool.seek(offset)
    return spool.read(length)


# ---------------------------------------------------------------------------- reading back


def read_shard(path: Path) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    """The rows of a committed shard: (metadata, image bytes or None, image extension)."""
    if path.suffix == ".tar":
        yield from _read_tar(path)
        meta = path.with_suffix(".parquet")
        if meta.is_file():  # the rows without a sample are only in the metadata
            yield from (r for r in _read_parquet(meta) if r[0].get("status") != "success")
        return
    yield from _read_parquet(path)


def _read_parquet(path: Path) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    need_pyarrow()
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as table:
        image = next((n for n in ("jpg", "png", "webp") if n in table.schema_arrow.names), None)
        for batch in table.iter_batches(batch_size=_ROW_GROUP):
            for row in batch.to_pylist():
                data = row.pop(image, None) if image else None
                yield row, data, f".{image}"


def _read_tar(path: Path) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
    with tarfile.open(path) as tar:
        pending: dict[str, tuple[bytes | None, str, dict[str, Any] | None]] = {}
        for member in tar:
            key, _, ext = member.name.partition(".")
            blob = tar.extractfile(member)
            data = blob.read() if blob is not None else b""
            image, image_ext, meta = pending.get(key, (None, ".jpg", None))
            if ext == "json":
                meta = json.loads(data)
            elif ext != "txt":
                image, image_ext = data, f".{ext}"
            if meta is not None and image is not None:
                pending.pop(key, None)
                yield meta, image, image_ext
            else:
                pending[key] = (image, image_ext, meta)


def shard_keys(path: Path) -> frozenset[str]:
    """The keys of the samples a committed shard holds (empty if it is not there)."""
    if not path.is_file():
        return frozenset()
    try:
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                return frozenset(m.name.split(".", 1)[0] for m in tar if "." in m.name)
        return frozenset(row["key"] for row, data, _ in read_shard(path) if data is not None)
    except (OSError, tarfile.TarError, ValueError, KeyError):
        return frozenset()  # unreadable: nothing in it is kept


# ---------------------------------------------------------------------------- the set


class ShardSet:
    """The open shards of a run, fed one Result at a time in the recording thread.

    ``prior``: the records of earlier runs this run does not fetch again (kept by
    ``--resume``, or beyond its -n): a shard this run adds to is rewritten with them, their
    samples copied from the shard it replaces. ``total``: the number of input rows, when
    known: a shard commits as soon as every row of its range has a result; the rest commit
    at ``close``.
    """

    def __init__(
        self,
        out: Path,
        fmt: str,
        size: int,
        caption: bool,
        prior: Mapping[int, Result] | None = None,
        total: int | None = None,
    ) -> None:
        need_pyarrow()
        self.out, self.fmt, self.size, self.caption, self.total = out, fmt, size, caption, total
        self._prior: dict[int, dict[int, Result]] = {}
        for index, record in (prior or {}).items():
            self._prior.setdefault(index // size, {})[index] = record
        self._open: dict[int, ShardWriter] = {}
        self._done: dict[int, int] = {}
        self.committed: list[Path] = []

    def add(self, result: Result) -> None:
        """Put ``result`` in its shard (opened on first use); commit a full shard."""
        shard = result.index // self.size
        writer = self._open.get(shard) or self._start(shard)
        sample = result.sample
        writer.add(result, sample.data if sample else None, sample.ext if sample else ".jpg")
        self._done[shard] = self._done.get(shard, 0) + 1
        if self._done[shard] >= self._expected(shard):
            self._commit(shard)

    def _expected(self, shard: int) -> int:
        """The results this run still owes ``shard``: its rows in range, less the prior
        ones (which are beyond the range, or kept)."""
        first = shard * self.size
        last = first + self.size if self.total is None else min(first + self.size, self.total)
        prior = sum(1 for i in self._prior.get(shard, {}) if first <= i < last)
        return max(0, last - first - prior)

    def _start(self, shard: int) -> ShardWriter:
        writer = ShardWriter(self.out, shard, self.fmt, self.caption)
        prior = self._prior.get(shard, {})
        try:
            if prior:
                writer.seed(prior.__contains__)
        except BaseException:
            writer.abort()
            raise
        self._open[shard] = writer
        return writer

    def _commit(self, shard: int) -> None:
        writer = self._open.pop(shard)
        try:
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.committed.append(writer.path)

    def close(self, commit: bool = True) -> None:
        """Commit every open shard (a run that ended or was interrupted: a resumed run
        rewrites it whole), or, after a storage fault, throw them away."""
        for shard in sorted(self._open):
            if commit:
                self._commit(shard)
            else:
                self._open.pop(shard).abort()
