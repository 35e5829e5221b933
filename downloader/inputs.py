"""Input tables: the rows of a URL list, streamed, whatever its format.

``.txt`` (one URL a line), ``.csv``, ``.tsv``, ``.json`` (an array of objects), ``.jsonl`` and
``.parquet``, each text format optionally ``.gz``; chosen by the file's extension or named
(``--input-format``). Every reader yields ``Row``s lazily: a parquet file is read one row
group at a time and a JSON array one object at a time, so a list of 10^7 rows never sits in
memory. The columns a run needs are checked before the first row is yielded: a missing one
is a ``ConfigError`` naming the columns the file has.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .settings import DatasetSettings

FORMATS: tuple[str, ...] = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
_BATCH = 4096  # parquet rows per batch: a few MB of URLs and captions at most


@dataclass(frozen=True)
class Columns:
    """Which columns a run reads: the URL, the caption, and any to keep with each image."""

    url: str = "url"
    caption: str = ""
    additional: tuple[str, ...] = ()

    @classmethod
    def of(cls, dataset: DatasetSettings) -> Columns:
        extra = tuple(c for c in dataset.save_additional_columns.split(",") if c)
        return cls(dataset.url_col, dataset.caption_col, extra)

    def wanted(self) -> list[str]:
        names = [self.url, *([self.caption] if self.caption else []), *self.additional]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Row:
    """One input row: its URL ("" when the row could not be read: a failed job), its
    caption, and the additional columns with the types the file gave them."""

    url: str
    caption: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)


def format_of(path: str, named: str = "auto") -> str:
    """The input format: ``named`` unless it is ``auto``, else from the extension (a text
    format under ``.gz`` is read through gzip); ``txt`` for anything else and for stdin."""
    if named != "auto":
        return named
    name = path.lower().removesuffix(".gz")
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    return "txt"


def read_rows(path: str, fmt: str, columns: Columns) -> Rows:
    """The rows of ``path`` (``-``: stdin). Raises ``ConfigError`` at once (not on first
    use) for a file that cannot be read or lacks a column; ``close()`` (or the end of the
    rows) closes the file."""
    if fmt == "parquet":
        return _parquet_rows(path, columns)
    fh = _open_text(path)
    try:
        return Rows(path, _text_rows(fh, path, fmt, columns), fh)
    except (OSError, EOFError) as exc:  # a file named .gz that is not gzip, ...
        fh.close()
        raise ConfigError(f"cannot read URL list {path}: {exc}") from None
    except BaseException:
        if fh is not sys.stdin:
            fh.close()
        raise


class Rows(Iterator[Row]):
    """Rows being read from an open file: closed at their end, on an error, or by
    ``close``. A file that turns out unreadable part-way (a corrupt gzip stream) is a
    ``ConfigError``."""

    def __init__(self, path: str, rows: Iterator[Row], fh: Any) -> None:
        self._path, self._rows, self._fh = path, rows, fh

    def __next__(self) -> Row:
        try:
            return next(self._rows)
        except StopIteration:
            self.close()
            raise
        except (OSError, EOFError) as exc:
            self.close()
            raise ConfigError(f"cannot read URL list {self._path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fh is not None and self._fh is not sys.stdin:
            self._fh.close()
        self._fh = None


def _open_text(path: str) -> IO[str]:
    if path == "-":
        return sys.stdin
    try:
        if path.lower().endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
        return open(path, encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise ConfigError(f"cannot read URL list {path}: {exc.strerror or exc}") from None


def _text_rows(fh: IO[str], name: str, fmt: str, columns: Columns) -> Iterator[Row]:
    if fmt in ("csv", "tsv"):
        first = fh.readline()
        delimiter = "\t" if fmt == "tsv" or "\t" in first else ","
        return _table_rows(fh, first, name, delimiter, columns)
    if fmt == "jsonl":
        return _object_rows(_jsonl_objects(fh), name, columns)
    if fmt == "json":
        return _object_rows(_array_items(fh, name), name, columns)
    first = fh.readline()
    header = first.strip()
    delimiter = "\t" if "\t" in header else ","
    if delimiter in header and columns.url.lower() in _header(header, delimiter):
        return _table_rows(fh, first, name, delimiter, columns)  # a table named .txt
    if columns.caption or columns.additional:
        raise ConfigError(
            f"{name} is a plain URL list: it has no columns for --caption-col or "
            "--save-additional-columns (use a CSV, TSV, JSON, JSONL or parquet file)"
        )
    return _plain_lines(first, fh)


def _header(line: str, delimiter: str) -> list[str]:
    return [c.strip().lower() for c in next(csv.reader([line], delimiter=delimiter), [])]


def _missing(name: str, have: Sequence[str], columns: Columns) -> None:
    lowered = {c.lower() for c in have}
    for wanted in columns.wanted():
        if wanted.lower() not in lowered:
            raise ConfigError(
                f"no {wanted!r} column in {name} (columns: {', '.join(have) or 'none'})"
            )


def _table_rows(
    fh: IO[str], first: str, name: str, delimiter: str, columns: Columns
) -> Iterator[Row]:
    """A CSV or TSV: its header line is ``first``; column names match case-insensitively
    (values stay strings: a CSV has no types)."""
    header = _header(first.strip(), delimiter)
    _missing(name, header, columns)
    where = {wanted: header.index(wanted.lower()) for wanted in columns.wanted()}
    return _table_values(csv.reader(fh, delimiter=delimiter), where, columns)


def _table_values(
    reader: Iterator[list[str]], where: dict[str, int], columns: Columns
) -> Iterator[Row]:
    """One Row a line; a line the csv module cannot read becomes an empty (failed) URL."""
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield Row("")
            continue
        if cells:
            values = {k: cells[i].strip() if i < len(cells) else "" for k, i in where.items()}
            yield _row(values, columns)


def _row(values: dict[str, Any], columns: Columns) -> Row:
    """A Row from one record's values (missing keys: None; no URL: a failed job). The
    additional columns keep their types where JSON has them; other values (a parquet
    timestamp, decimal, bytes) become text, so every manifest line and shard can hold them."""
    url = values.get(columns.url)
    caption = values.get(columns.caption) if columns.caption else None
    return Row(
        "" if url is None else str(url).strip(),
        None if caption is None else str(caption),
        {name: _json_safe(values.get(name)) for name in columns.additional},
    )


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    isoformat = getattr(value, "isoformat", None)  # datetime, date, time
    return isoformat() if callable(isoformat) else str(value)


_END = object()  # no object at all (an empty file)


def _jsonl_objects(fh: IO[str]) -> Iterator[Any]:
    """One object a line (blank lines skipped); a line that does not parse is None (a
    failed job, keeping its index)."""
    for line in fh:
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            yield None


def _object_rows(objects: Iterator[Any], name: str, columns: Columns) -> Iterator[Row]:
    """Rows of JSON objects. The first one's keys are checked for the columns now (not on
    first use), and name them for every row, case-insensitively as in a CSV header."""
    first = next(objects, _END)
    if first is _END:
        return iter(())
    keys: dict[str, str] = {}
    if isinstance(first, dict):
        _missing(name, list(first), columns)
        by_lower = {str(k).lower(): str(k) for k in first}
        keys = {wanted: by_lower[wanted.lower()] for wanted in columns.wanted()}
    return _named_rows(first, objects, keys, columns)


def _named_rows(
    first: Any, rest: Iterator[Any], keys: dict[str, str], columns: Columns
) -> Iterator[Row]:
    for record in _chain_any(first, rest):
        if not isinstance(record, dict):
            yield Row("")
            continue
        yield _row({w: _lookup(record, keys.get(w, w)) for w in columns.wanted()}, columns)


def _lookup(record: dict[str, Any], name: str) -> Any:
    """``record[name]``, or under another case of it (a later object may spell it so)."""
    if name in record:
        return record[name]
    lowered = name.lower()
    return next((v for k, v in record.items() if str(k).lower() == lowered), None)


def _chain_any(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _array_items(fh: IO[str], name: str, chunk: int = 1 << 16) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    buf = fh.read(chunk).lstrip()
    if not buf.startswith("["):
        raise ConfigError(f"{name} is not a JSON array of objects")
    buf = buf[1:]
    while True:
        buf = buf.lstrip().removeprefix(",").lstrip()
        if buf.startswith("]"):
            return
        try:
            item, end = decoder.raw_decode(buf)
        except ValueError:
            more = fh.read(chunk)
            if not more:
                raise ConfigError(f"{name}: the JSON array is cut short or invalid") from None
            buf += more
            continue
        yield item
        buf = buf[end:]
        if len(buf) < chunk:
            buf += fh.read(chunk)


def _parquet_rows(path: str, columns: Columns) -> Rows:
    from .extras import need

    pq = need("pyarrow.parquet", "dataset", "a parquet URL list")
    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"cannot read URL list {path}: {exc}") from None
    names = table.schema_arrow.names
    try:
        _missing(path, names, columns)
    except ConfigError:
        table.close()
        raise
    exact = {w: next(n for n in names if n.lower() == w.lower()) for w in columns.wanted()}
    return Rows(path, _parquet_batches(table, exact, columns), table)


def _parquet_batches(table: Any, exact: dict[str, str], columns: Columns) -> Iterator[Row]:
    for batch in table.iter_batches(batch_size=_BATCH, columns=list(dict.fromkeys(exact.values()))):
        values = {wanted: batch.column(name).to_pylist() for wanted, name in exact.items()}
        for i in range(batch.num_rows):
            yield _row({k: v[i] for k, v in values.items()}, columns)


def _plain_lines(first: str, fh: IO[str]) -> Iterator[Row]:
    for line in _chain(first, fh):
        text = line.strip()
        if text and not text.startswith("#"):
            yield Row(text)


def _chain(first: str, fh: IO[str]) -> Iterator[str]:
    if first:
        yield first
        yield from fh
