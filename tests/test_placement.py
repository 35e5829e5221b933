"""placement: where each backend runs an image's CPU stage and its write, one table."""

from __future__ import annotations

import typing

import pytest

from downloader.backends import BACKENDS
from downloader.choices import BackendName
from downloader.placement import Placement, placement
from downloader.settings import Settings, ThumbnailSettings


def settings_with(
    executor: str = "auto", size: int = 128, verify: str = "full", python_cpu_ms: int = 0
) -> Settings:
    thumbs = ThumbnailSettings(size=size, executor=executor, python_cpu_ms=python_cpu_ms)  # type: ignore[arg-type]
    return Settings(verify=verify, thumbnails=thumbs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("executor", "size", "verify", "python_cpu_ms", "resolved"),
    [
        ("auto", 0, "header", 0, "inline"),  # nothing decoded: no hop
        ("auto", 0, "full", 0, "thread"),
        ("auto", 128, "header", 0, "thread"),  # a thumbnail decodes anyway
        ("auto", 0, "header", 5, "thread"),  # user code in the stage
        ("process", 0, "header", 0, "process"),  # a choice is kept
        ("thread", 0, "header", 0, "thread"),
    ],
)
def test_auto_executor_is_inline_only_when_no_pixels_are_decoded(
    executor: str, size: int, verify: str, python_cpu_ms: int, resolved: str
) -> None:
    settings = settings_with(executor, size, verify, python_cpu_ms)
    assert placement(settings, "asyncio").cpu == resolved


INLINE = Placement("inline", "inline")
LIGHT = {"size": 0, "verify": "header"}  # auto: nothing decoded

CASES: list[tuple[BackendName, dict[str, typing.Any], Placement]] = [
    # asyncio: the CPU stage where auto or the choice says; the write on the loop, except
    # beside a process pool (aiofiles' threads).
    ("asyncio", {}, Placement("thread", "inline")),
    ("asyncio", LIGHT, INLINE),
    ("asyncio", {**LIGHT, "python_cpu_ms": 3}, Placement("thread", "inline")),
    ("asyncio", {"executor": "thread"}, Placement("thread", "inline")),
    ("asyncio", {"executor": "inline"}, INLINE),
    ("asyncio", {"executor": "process"}, Placement("process", "thread")),
    # threads: the download thread is a thread already; only a process pool is added.
    ("threads", {}, INLINE),
    ("threads", {"executor": "thread"}, INLINE),
    ("threads", LIGHT, INLINE),
    ("threads", {"executor": "process"}, Placement("process", "inline")),
    # dask: threads for both, whatever is asked (no process pool in a daemonic worker;
    # OUT is a shared file system, so no write on the loop).
    ("dask", {}, Placement("thread", "thread")),
    ("dask", LIGHT, Placement("thread", "thread")),
    ("dask", {"executor": "process"}, Placement("thread", "thread")),
    ("dask", {"executor": "inline"}, Placement("thread", "thread")),
    # the others: everything in the job's own worker.
    *(
        (name, changes, INLINE)
        for name in ("sync", "processes", "hybrid")
        for changes in ({}, LIGHT, {"executor": "process"}, {"executor": "thread"})
    ),
]


@pytest.mark.parametrize(("backend", "changes", "expected"), CASES)
def test_placement_table(
    backend: BackendName, changes: dict[str, typing.Any], expected: Placement
) -> None:
    assert placement(settings_with(**changes), backend) == expected


def test_the_table_covers_every_backend() -> None:
    assert {backend for backend, _, _ in CASES} == set(BACKENDS)


def test_a_resize_is_decoded_work_for_auto() -> None:
    from downloader.settings import DatasetSettings

    light = settings_with(size=0, verify="header")
    assert placement(light, "asyncio").cpu == "inline"
    resized = light.replace(dataset=DatasetSettings(resize_mode="center_crop"))
    assert placement(resized, "asyncio").cpu == "thread"
