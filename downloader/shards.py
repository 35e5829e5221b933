"""Dataset shards: webdataset tars and parquet files, each complete under its final name
or not there at all.

Shard k holds input rows k*S ... (k+1)*S-1 (S = ``--samples-per-shard``), as img2dataset
assigns them, so every backend and every resumed run agrees where an image goes. A shard's
samples are streamed, in the order they finish, to a hidden local temp file (memory: only
its metadata rows, a few hundred bytes each); when every row of its range has a result the
shard commits through its store (``stores.py``: a folder or a URL): its
``NNNNN_stats.json`` and metadata ``NNNNN.parquet`` first, then the shard itself, each
committed whole (a folder: fsync and rename; an object store: one upload). The shard's
commit is the one that counts: a reader never sees a torn shard, and after ``kill -9``
every shard in OUT is whole. In a URL store, ``NNNNN.jsonl`` follows: the manifest lines of
the shard's rows, the record that it is committed (``shardreader.committed_digests``). A
resumed run that adds to a committed shard rewrites it: the samples it keeps are copied
from the old shard into the new one, which replaces it in one commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import tarfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import StorageFault
from .result import Result
from .shardreader import ROW_GROUP, jsonl_name, need_pyarrow, read_shard
from .storage import storage_fault
from .stores import LocalStore, Store, StoreError

SHARD_FORMATS = ("webdataset", "parquet")
KEY_DIGITS = 9
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}


def key_of(index: int) -> str:
    """The sample key of input row ``index``: unique over the dataset, stable on resume."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(shard: int, fmt: str) -> str:
    return f"{shard:05d}{_SUFFIX[fmt]}"


def line_of(result: Result) -> bytes:
    """``result``'s manifest line (the manifest's, and a URL store's ``NNNNN.jsonl``)."""
    text = json.dumps(result.to_record(), ensure_ascii=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8", "replace")


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


def hand_over(add: Callable[[Result], None], result: Result, out: Path) -> Result:
    """``add`` the row to its shard (a ``ShardSet``'s or a ``ShardWriter``'s); the Result
    back without its sample (whoever keeps Results keeps no image bytes), or marked with
    the storage fault that kept it out of the shard."""
    lean = dataclasses.replace(result, sample=None)
    if result.fault:
        return lean
    try:
        add(result)
    except OSError as exc:
        return dataclasses.replace(lean, fault=shard_fault(exc, out))
    return lean


def shard_fault(exc: OSError, out: Path) -> StorageFault:
    """A shard that cannot be written stops the run: the rows of its range are in no
    committed shard, so going on would only fetch what --resume fetches again."""
    if isinstance(exc, StoreError):
        return StorageFault(str(exc), "make the store reachable and writable")
    fault = storage_fault(exc, out)
    return fault or StorageFault(f"cannot write a shard in {out}: {exc.strerror or exc}", "fix it")


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
    """One open shard: samples streamed to a local temp file, committed whole by
    ``commit`` through ``store``."""

    def __init__(self, store: Store, shard: int, fmt: str, caption: bool) -> None:
        self.store = store
        self.name = shard_name(shard, fmt)
        self.fmt = fmt
        self.caption = caption
        self.rows: list[dict[str, Any]] = []
        self.stats = _Stats()
        # A URL store keeps the manifest lines of the shard's rows beside it.
        self.lines: dict[int, bytes] | None = {} if store.remote else None
        self._tmp = store.temp(self.name)
        # Both stay open until commit or abort, across many add() calls.
        self._spool: IO[bytes] = open(self._tmp, "wb")  # noqa: SIM115
        self._tar = (
            tarfile.open(fileobj=self._spool, mode="w")  # noqa: SIM115
            if fmt == "webdataset"
            else None
        )
        self._where: list[tuple[int, int]] = []  # parquet: (offset, length) in the spool
        self._ext = ".jpg"

    def add(self, result: Result) -> None:
        """Record one row, with its sample when it has one (a failed row has none)."""
        sample = result.sample
        data, ext = (sample.data, sample.ext) if sample is not None else (None, ".jpg")
        self.add_row(metadata_row(result, self.caption), data, ext)
        if self.lines is not None:
            self.lines[result.index] = line_of(result)

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
        says this run does not fetch again (their samples too, and in a URL store their
        manifest lines)."""
        tar = self._tar is not None
        meta = f"{self.name.split('.')[0]}.parquet"
        with (
            self.store.fetched(self.name) as shard,
            self.store.fetched(meta) if tar else contextlib.nullcontext() as rows,
        ):
            if shard is None:
                return
            for row, data, ext in read_shard(shard, tar, rows):
                key = str(row.get("key", ""))
                if key.isdigit() and keep(int(key)):
                    self.add_row(row, data, ext)
        if self.lines is not None:
            self.lines.update(_kept_lines(self.store.read_bytes(jsonl_name(self.name)), keep))

    def commit(self) -> None:
        """Commit the stats, the metadata and the shard, each whole; the shard last (then,
        in a URL store, its manifest lines)."""
        stem = self.name.split(".")[0]
        self._put(f"{stem}_stats.json", self.stats.to_json())
        if self._tar is not None:
            self._tar.close()
            self._spool.close()
            meta = self.store.temp(f"{stem}.parquet")
            _write_parquet(meta, self.rows, None, None)
            self.store.commit(meta, f"{stem}.parquet")
            self.store.commit(self._tmp, self.name)
        else:
            self._spool.close()
            table = self.store.temp(self.name)
            with open(self._tmp, "rb") as spool:
                _write_parquet(table, self.rows, (self._ext.lstrip("."), self._where), spool)
            self._tmp.unlink(missing_ok=True)
            self.store.commit(table, self.name)
        if self.lines is not None:
            self._put(jsonl_name(self.name), b"".join(self.lines[i] for i in sorted(self.lines)))

    def _put(self, name: str, data: bytes) -> None:
        tmp = self.store.temp(name)
        try:
            tmp.write_bytes(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.store.commit(tmp, name)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._tar is not None:
                self._tar.close()
        with contextlib.suppress(OSError):
            self._spool.close()
        self._tmp.unlink(missing_ok=True)


def _kept_lines(text: bytes | None, keep: Callable[[int], bool]) -> dict[int, bytes]:
    """The manifest lines of a committed ``NNNNN.jsonl`` whose index ``keep`` keeps."""
    kept: dict[int, bytes] = {}
    for line in (text or b"").splitlines():
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            index = json.loads(line).get("index")
            if isinstance(index, int) and keep(index):
                kept[index] = line + b"\n"
    return kept


def _write_parquet(
    path: Path,
    rows: list[dict[str, Any]],
    images: tuple[str, list[tuple[int, int]]] | None,
    spool: IO[bytes] | None,
) -> None:
    """The metadata ``rows`` (and, for the parquet format, each row's image read back
    from ``spool`` in a binary column named after its format) as one parquet file at the
    temp path ``path`` (removed if it fails)."""
    pa = need_pyarrow()
    import pyarrow.parquet as pq

    schema, texts = _schema(pa, rows)
    if images is not None:
        schema = schema.append(pa.field(images[0], pa.binary()))
    try:
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, max(len(rows), 1), ROW_GROUP):
                chunk = rows[start : start + ROW_GROUP]
                columns = {name: [r.get(name) for r in chunk] for name in schema.names}
                for name in texts:
                    columns[name] = [_as_text(v) for v in columns[name]]
                if images is not None and spool is not None:
                    columns[images[0]] = [
                        _read(spool, *at) for at in images[1][start : start + ROW_GROUP]
                    ]
                writer.write_table(pa.table(columns, schema=schema))
    except pa.ArrowException as exc:  # values pyarrow cannot write: the shard cannot commit
        path.unlink(missing_ok=True)
        raise OSError(errno.EINVAL, f"cannot write the metadata {path.name}: {exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


_FIXED = {
    "url": "string", "caption": "string", "key": "string", "status": "string",
    "error_message": "string", "width": "int64", "height": "int64",
    "original_width": "int64", "original_height": "int64", "sha256": "string",
}  # fmt: skip


def _schema(pa: Any, rows: list[dict[str, Any]]) -> tuple[Any, set[str]]:
    """The metadata schema, ours fixed and each input column's type inferred over every
    row (a column that is None in the first rows still gets its type); a column whose rows
    disagree (1 here, "a" there) is text, and its values are written as JSON text: the
    second set."""
    names = list(rows[0]) if rows else list(_FIXED)
    fields, texts = [], set()
    for name in names:
        if name in _FIXED:
            fields.append(pa.field(name, getattr(pa, _FIXED[name])()))
            continue
        try:
            kind = pa.array([r.get(name) for r in rows]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            kind = None
        if kind is None or _has_empty_struct(pa, kind):  # parquet cannot hold a struct<>
            kind = None
            texts.add(name)
        fields.append(
            pa.field(name, pa.string() if kind is None or pa.types.is_null(kind) else kind)
        )
    return pa.schema(fields), texts


def _has_empty_struct(pa: Any, kind: Any) -> bool:
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(
            _has_empty_struct(pa, kind.field(i).type) for i in range(kind.num_fields)
        )
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return bool(_has_empty_struct(pa, kind.value_type))
    return False


def _as_text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _read(spool: IO[bytes], offset: int, length: int) -> bytes | None:
    if length < 0:
        return None
    spool.seek(offset)
    return spool.read(length)


# ---------------------------------------------------------------------------- the set


class ShardSet:
    """The open shards of a run, fed one Result at a time in the recording thread.

    ``prior``: the records of earlier runs this run does not fetch again (kept by
    ``--resume``, or beyond its -n): a shard this run adds to is rewritten with them, their
    samples copied from the shard it replaces. ``total``: the number of input rows, when
    known: a shard commits as soon as every row of its range has a result; the rest commit
    at ``close``. A commit (its fsyncs, or its upload) runs on a thread of its own, so the
    downloads in flight do not wait for it; one that fails is raised by the next ``add``
    or by ``close``.
    """

    def __init__(
        self,
        out: Path,
        fmt: str,
        size: int,
        caption: bool,
        prior: Mapping[int, Result] | None = None,
        total: int | None = None,
        store: Store | None = None,
    ) -> None:
        need_pyarrow()
        self.out, self.fmt, self.size, self.caption, self.total = out, fmt, size, caption, total
        self.store = store or LocalStore(out)  # ``out``: OUT, or a URL OUT's state folder
        self._prior: dict[int, dict[int, Result]] = {}
        for index, record in (prior or {}).items():
            self._prior.setdefault(index // size, {})[index] = record
        self._open: dict[int, ShardWriter] = {}
        self._done: dict[int, int] = {}
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="shard-commit")
        self._commits: list[Future[None]] = []

    def add(self, result: Result) -> None:
        """Put ``result`` in its shard (opened on first use); commit a full shard."""
        self._reap(wait=False)
        shard = result.index // self.size
        writer = self._open.get(shard) or self._start(shard)
        writer.add(result)
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
        writer = ShardWriter(self.store, shard, self.fmt, self.caption)
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
        self._commits.append(self._committer.submit(_commit_whole, self._open.pop(shard)))

    def _reap(self, wait: bool) -> None:
        """Raise the error of a commit that failed (the first); forget those done."""
        pending = []
        for future in self._commits:
            if wait or future.done():
                future.result()
            else:
                pending.append(future)
        self._commits = pending

    def close(self, commit: bool = True) -> None:
        """Commit every open shard (a run that ended or was interrupted: a resumed run
        rewrites it whole) and wait for every commit; or, after a storage fault, throw the
        open ones away (the commits under way finish, their errors unheard)."""
        try:
            for shard in sorted(self._open):
                if commit:
                    self._commit(shard)
                else:
                    self._open.pop(shard).abort()
            if commit:
                self._reap(wait=True)
            else:
                wait(self._commits)
        finally:
            self._committer.shutdown(wait=True)


def _commit_whole(writer: ShardWriter) -> None:
    try:
        writer.commit()
    except BaseException:
        writer.abort()
        raise
