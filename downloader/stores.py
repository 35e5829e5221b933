"""Where a run's shards go: OUT as a local folder, or as an fsspec URL (``s3://bucket/prefix``,
``gs://``, ``az://``, ``file://`` ...). The writers never know which; every store keeps one
contract:

- ``commit(tmp, name)``: a finished local temp file (made by ``temp(name)``) becomes the
  object ``name`` whole: a reader sees the old object or the new one, never a torn one.
  A folder: fsync, rename, fsync the folder. An object store (s3, gs, az): one
  ``put_file``, that is one PUT, or a multipart upload the store shows only once it is
  completed. Any other fsspec file system: the upload goes to a hidden temp name, then
  one move.
- ``fetched(name)``: a committed object as a local file (a folder's own file, or a
  download), read by ``--resume`` and to seed a shard that is rewritten.
- ``exists``, ``names``, ``read_bytes``: what is committed.
- ``check()``: reachable and writable, or a one-line ``StorageError`` naming the endpoint
  or the bucket (a URL; a folder is proven by ``storage.prepare_out``).
- ``lock(state)``: one run per OUT: a folder's flock, a URL's lock object (``lock.py``).

Credentials and the endpoint come the way every tool of the store takes them (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``,
read by botocore): never from the URL, never in a message or a manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .errors import ConfigError, StorageError
from .storage import TEMP_SUFFIX, check_writable, temp_path

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
_CONDITIONAL = frozenset({"s3", "s3a"})  # If-None-Match / If-Match on PUT
STATE_ROOT = Path(".downloader-state")
_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Connection errors, by name: botocore's and aiohttp's do not derive from OSError.
_UNREACHABLE = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
     "ClientConnectorError", "ServerDisconnectedError", "ConnectionError"}
)  # fmt: skip


def is_url(text: object) -> bool:
    """Whether ``text`` names a store by URL (``s3://...``) rather than a local folder."""
    return isinstance(text, str) and _URL.match(text.strip()) is not None


def check_url(url: str) -> str:
    """``url`` checked and without a trailing slash; a ``ConfigError`` for a URL that
    carries credentials or names no bucket."""
    url = url.strip().rstrip("/")
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        raise ConfigError(
            f"--out {scheme}://...: credentials do not go in the URL; set them the store's "
            "way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if scheme.lower() != "file" and not netloc:
        raise ConfigError(f"--out {url} names no bucket: use {scheme}://BUCKET/PREFIX")
    if any(part in (".", "..") for part in rest.split("/")):
        raise ConfigError(f"--out {url}: . and .. are not allowed in a store URL")
    return url


def state_folder(url: str, state: str) -> Path:
    """The local folder of a URL OUT's manifest, lock and temp files: ``state``, or one
    of its own under ``.downloader-state`` (the same URL, the same folder: --resume finds
    it)."""
    if state:
        return Path(state)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("._-")[:60]
    return STATE_ROOT / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def scrub(text: str) -> str:
    """``text`` with the values of the credential variables masked: a store's error
    message is printed, and must never carry them."""
    for name in _SECRETS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


class StoreError(OSError):
    """A store's operation failed: a one-line reason that names the URL (an OSError, so
    the writers treat it as any other storage fault)."""


class Store(Protocol):
    remote: bool  # a URL: the manifest is kept elsewhere, beside each shard as JSONL too
    where: str  # the folder or the URL, for messages

    def temp(self, name: str) -> Path: ...

    def commit(self, tmp: Path, name: str) -> None: ...

    def fetched(self, name: str) -> contextlib.AbstractContextManager[Path | None]: ...

    def read_bytes(self, name: str) -> bytes | None: ...

    def exists(self, name: str) -> bool: ...

    def names(self) -> frozenset[str]: ...

    def check(self) -> None: ...

    def lock(self, state: Path) -> contextlib.AbstractContextManager[object]: ...


def store_for(out: Path, store: str, scratch: Path | None = None) -> Store:
    """OUT's store: the folder ``out``, or the URL ``store``, whose temp files go to
    ``scratch`` (default: ``out``, the run's local state folder)."""
    if not store:
        return LocalStore(out)
    return FsspecStore(store, scratch or out)


# ---------------------------------------------------------------------------- a folder


class LocalStore:
    remote = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where = str(folder)

    def temp(self, name: str) -> Path:
        return temp_path(self.folder / name)  # same folder: the rename stays atomic

    def commit(self, tmp: Path, name: str) -> None:
        try:
            fsync_replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def fetched(self, name: str) -> Iterator[Path | None]:
        path = self.folder / name
        yield path if path.is_file() else None

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except OSError:
            return None

    def exists(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def names(self) -> frozenset[str]:
        with contextlib.suppress(OSError):
            return frozenset(entry.name for entry in os.scandir(self.folder))
        return frozenset()

    def check(self) -> None:
        check_writable(self.folder)

    def lock(self, state: Path) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()  # the folder's own flock (lock.OutputLock) holds it


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


# ---------------------------------------------------------------------------- a URL


class FsspecStore:
    remote = True

    def __init__(self, url: str, scratch: Path) -> None:
        from .extras import need

        need("fsspec", "s3", "an --out URL")
        import fsspec

        self.where = url
        self.scheme = url.split("://", 1)[0].lower()
        self.scratch = scratch
        try:
            # No instance cache: the credentials and endpoint are the environment's now.
            self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            extra = " (pip install 'downloader[s3]')" if self.scheme.startswith("s3") else ""
            raise ConfigError(f"--out {url}: {str(exc).splitlines()[0]}{extra}") from None
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def temp(self, name: str) -> Path:
        self.scratch.mkdir(parents=True, exist_ok=True)
        return temp_path(self.scratch / name)

    def commit(self, tmp: Path, name: str) -> None:
        try:
            if self.scheme in OBJECT_STORES:
                self.fs.put_file(str(tmp), self._path(name))
            else:
                hidden = self._path(f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
                self.fs.put_file(str(tmp), hidden)
                self.fs.mv(hidden, self._path(name))
        except Exception as exc:  # each store library raises its own kinds
            raise StoreError(self.why(exc, f"cannot write {self.where}/{name}")) from None
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def fetched(self, name: str) -> Iterator[Path | None]:
        local = self.temp(name)
        try:
            try:
                self.fs.get_file(self._path(name), str(local))
                found = True
            except FileNotFoundError:
                found = False
            except Exception as exc:
                raise StoreError(self.why(exc, f"cannot read {self.where}/{name}")) from None
            yield local if found else None
        finally:
            local.unlink(missing_ok=True)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreError(self.why(exc, f"cannot read {self.where}/{name}")) from None
        return data

    def exists(self, name: str) -> bool:
        try:
            self.fs.info(self._path(name), refresh=True)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise StoreError(self.why(exc, f"cannot read {self.where}/{name}")) from None
        return True

    def names(self) -> frozenset[str]:
        try:
            listed = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return frozenset()
        except Exception as exc:
            raise StoreError(self.why(exc, f"cannot list {self.where}")) from None
        return frozenset(str(path).rstrip("/").rsplit("/", 1)[-1] for path in listed)

    def check(self) -> None:
        """Prove the store is reachable and OUT writable: a probe object, written and
        removed."""
        probe = self._path(f".write-test-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        try:
            if self.scheme not in OBJECT_STORES:
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise StorageError(self.why(exc, f"cannot write to {self.where}")) from None

    def lock(self, state: Path) -> contextlib.AbstractContextManager[object]:
        from .lock import RemoteLock

        return RemoteLock(self, state)

    # ------------------------------------------------------------------ messages

    def endpoint(self) -> str:
        """The endpoint an S3 store talks to, as botocore resolved it."""
        with contextlib.suppress(Exception):
            return str(self.fs.s3.meta.endpoint_url)
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")

    def why(self, exc: BaseException, what: str) -> str:
        """One line: ``what`` failed, and why, naming the endpoint or the bucket."""
        names = {kind.__name__ for kind in type(exc).__mro__}
        at = f" at {self.endpoint()}" if self.scheme in _CONDITIONAL else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if names & _UNREACHABLE:
            text = f"{what}: cannot reach the endpoint{at or ' of the store'} ({reason})"
        elif "NoCredentialsError" in names:
            text = (
                f"{what}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE)"
            )
        elif isinstance(exc, FileNotFoundError) and self.scheme in OBJECT_STORES:
            bucket = self.root.split("/", 1)[0]
            text = f"{what}: no bucket {bucket!r}{at}"
        elif isinstance(exc, PermissionError):
            text = f"{what}: access denied{at}"
        else:
            text = f"{what}{at}: {reason}"
        return scrub(text)

    # ------------------------------------------------------------------ the lock object

    def create(self, name: str, data: bytes) -> None:
        """Write ``name`` only if it is not there (``FileExistsError`` if it is)."""
        path = self._path(name)
        if self._conditional():
            self.fs.pipe_file(path, data, IfNoneMatch="*")
            return
        if self.fs.exists(path):
            raise FileExistsError(path)
        self.fs.pipe_file(path, data)

    def replace(self, name: str, data: bytes, tag: str | None) -> None:
        """Overwrite ``name`` only if it is still the version ``tag`` names."""
        if self._conditional() and tag:
            self.fs.pipe_file(self._path(name), data, IfMatch=tag)
        else:
            self.fs.pipe_file(self._path(name), data)

    def tagged(self, name: str) -> tuple[bytes | None, str | None]:
        """``name``'s bytes and its ETag (None, None: not there)."""
        try:
            tag = self.fs.info(self._path(name), refresh=True).get("ETag")
            return self.fs.cat_file(self._path(name)), tag
        except FileNotFoundError:
            return None, None

    def remove(self, name: str) -> None:
        with contextlib.suppress(Exception):  # best effort: a stale lock is taken over
            self.fs.rm_file(self._path(name))

    def _conditional(self) -> bool:
        """Whether PUT takes If-None-Match here: S3, through a botocore that knows it (s3fs
        drops arguments its botocore does not know, which would make the check a no-op)."""
        if self.scheme not in _CONDITIONAL:
            return False
        with contextlib.suppress(Exception):
            shape = self.fs.s3.meta.service_model.operation_model("PutObject").input_shape
            return "IfNoneMatch" in shape.members and "IfMatch" in shape.members
        return False
