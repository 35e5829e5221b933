"""Reading committed shards back: their rows (to seed a shard that is rewritten) and the
keys of their samples (what ``--resume`` may keep)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .stores import Store

ROW_GROUP = 256  # parquet rows per row group: bounded memory while committing
Row = tuple[dict[str, Any], bytes | None, str]  # metadata, image bytes or None, extension


def jsonl_name(shard: str) -> str:
    """``00000.tar`` -> ``00000.jsonl``: the manifest lines of a URL store's shard."""
    return f"{shard.split('.')[0]}.jsonl"


def need_pyarrow() -> Any:
    from .extras import need

    need("pyarrow.parquet", "dataset", "webdataset and parquet output")
    import pyarrow

    return pyarrow


def read_shard(path: Path, tar: bool, meta: Path | None = None) -> Iterator[Row]:
    """The rows of a committed shard file (``tar``: a webdataset shard, whose rows
    without a sample are only in its metadata file ``meta``)."""
    if tar:
        yield from _read_tar(path)
        if meta is not None:
            yield from (r for r in _read_parquet(meta) if r[0].get("status") != "success")
        return
    yield from _read_parquet(path)


def _read_parquet(path: Path) -> Iterator[Row]:
    need_pyarrow()
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as table:
        image = next((n for n in ("jpg", "png", "webp") if n in table.schema_arrow.names), None)
        for batch in table.iter_batches(batch_size=ROW_GROUP):
            for row in batch.to_pylist():
                data = row.pop(image, None) if image else None
                yield row, data, f".{image}"


def _read_tar(path: Path) -> Iterator[Row]:
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


def shard_digests(path: Path | None, tar: bool) -> dict[str, str]:
    """Key -> sha256 (of the downloaded bytes) of each sample a committed shard file holds,
    from its own metadata (each member's ``.json``, or the parquet's columns); empty if it
    is not there or cannot be read."""
    if path is None or not path.is_file():
        return {}
    try:
        if tar:
            return _tar_digests(path)
        need_pyarrow()
        import pyarrow.parquet as pq

        digests: dict[str, str] = {}
        with pq.ParquetFile(path) as table:
            image = next(n for n in ("jpg", "png", "webp") if n in table.schema_arrow.names)
            columns = ["key", "sha256", image]
            for batch in table.iter_batches(batch_size=ROW_GROUP, columns=columns):
                keys, sums = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                saved = batch.column(2).is_valid().to_pylist()
                digests.update(
                    (k, d) for k, d, ok in zip(keys, sums, saved, strict=True) if ok and d
                )
        return digests
    except (OSError, tarfile.TarError, ValueError, KeyError, StopIteration):
        return {}  # unreadable: nothing in it is kept


def _tar_digests(path: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    images: set[str] = set()
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext in ("txt", ""):
                continue
            if ext != "json":
                images.add(key)
                continue
            blob = tar.extractfile(member)
            meta = json.loads(blob.read()) if blob is not None else {}
            if isinstance(meta, dict) and isinstance(meta.get("sha256"), str):
                digests[key] = meta["sha256"]
    return {k: d for k, d in digests.items() if k in images}


def committed_digests(store: Store, name: str) -> dict[str, str]:
    """Key -> sha256 of the samples shard ``name`` holds as committed. A folder's shard is
    read. A URL store's is not downloaded: its ``NNNNN.jsonl``, uploaded after the shard,
    records the commit, and the ok lines it names are what the shard holds (after a crash
    between the two uploads of a rewrite, it names the old shard's, which the new one
    holds too)."""
    if not store.remote:
        with store.fetched(name) as path:
            return shard_digests(path, name.endswith(".tar"))
    if not store.exists(name):
        return {}
    digests: dict[str, str] = {}
    for line in (store.read_bytes(jsonl_name(name)) or b"").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("status") != "ok":
            continue
        key, digest = record.get("key"), record.get("sha256")
        if isinstance(key, str) and isinstance(digest, str):
            digests[key] = digest
    return digests
