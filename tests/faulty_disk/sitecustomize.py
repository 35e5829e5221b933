"""A disk that breaks after a number of file writes, in every process of a run.

On ``PYTHONPATH`` with ``FAULTY_DISK=ERRNO:AFTER:COUNTER`` set, every Python process of the
run (pool workers, hybrid workers, Dask workers: they inherit the environment) counts
its image and thumbnail writes in the shared file COUNTER; from write number AFTER + 1
on, each one fails with ERRNO (e.g. ENOSPC), as a full or broken disk would.
"""

from __future__ import annotations

import errno
import os

_SPEC = os.environ.get("FAULTY_DISK")

if _SPEC:
    from pathlib import Path

    from downloader import storage

    _CODE, _AFTER, _COUNTER = _SPEC.split(":", 2)
    _real = storage.write_atomic

    def _write_atomic(path: Path, data: bytes) -> None:
        fd = os.open(_COUNTER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b".")
            number = os.fstat(fd).st_size  # O_APPEND: one byte per write, in any process
        finally:
            os.close(fd)
        if number > int(_AFTER):
            code = getattr(errno, _CODE)
            raise OSError(code, os.strerror(code), str(path))
        _real(path, data)

    storage.write_atomic = _write_atomic
