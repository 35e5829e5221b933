"""Where an image's CPU stage (validation, thumbnail, ``python_cpu_ms``) and its file write
run, decided in one place from the settings and the backend; every backend asks here and
only carries the answer out.

``inline`` is the job's own worker: the event loop (asyncio, hybrid, a dask shard), the
download thread (threads), the worker process (processes), the caller (sync). ``thread``
and ``process`` are a pool beside it: for the CPU stage ``pools.cpu_executor``, for the
write aiofiles' threads. The choices were measured (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .choices import BackendName
from .settings import Settings

CpuPlace = Literal["inline", "thread", "process"]
WritePlace = Literal["inline", "thread"]


@dataclass(frozen=True)
class Placement:
    cpu: CpuPlace
    write: WritePlace


INLINE = Placement("inline", "inline")


def placement(settings: Settings, backend: BackendName) -> Placement:
    """Where ``backend`` runs the CPU stage and the write of each image."""
    if backend == "asyncio":
        cpu = _asyncio_cpu(settings)
        # On the loop, a write costs less than the hop to a thread, and far less than a
        # thread that writes while the loop runs (GIL contention); those figures were
        # taken beside a thread pool, and with a process pool the write stays in aiofiles.
        return Placement(cpu, "thread" if cpu == "process" else "inline")
    if backend == "threads":
        # The download threads already are a thread pool: only a process pool adds any.
        wanted = settings.thumbnails.executor
        return Placement("process", "inline") if wanted == "process" else INLINE
    if backend == "dask":
        # A Dask worker is a daemonic process, which may not start a process pool; OUT is
        # a shared file system there, where a write on the loop would stall every download.
        return Placement("thread", "thread")
    # sync and processes run everything in the job's own thread or process; a hybrid
    # worker process has a core of its own for it.
    return INLINE


def _asyncio_cpu(settings: Settings) -> CpuPlace:
    """``thumbnails.executor`` with ``auto`` decided: inline when the stage decodes no
    pixels and runs no ``python_cpu_ms`` (a header check and a hash cost less than the hop
    to a thread and back), else a thread pool (Pillow releases the GIL while it decodes)."""
    thumbs = settings.thumbnails
    if thumbs.executor != "auto":
        return thumbs.executor
    light = thumbs.size == 0 and settings.verify == "header" and not thumbs.python_cpu_ms
    resized = settings.dataset.resize_mode != "no"  # a sample that is decoded and encoded
    return "inline" if light and not resized else "thread"
