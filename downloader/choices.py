"""The choices a setting can take, as ``Literal`` types: the settings declare their fields
with them (and validate against them), and the backend registry is keyed by ``BackendName``.
A module of its own, importing nothing of the package, so that both can import it."""

from __future__ import annotations

import typing
from typing import Literal

BackendName = Literal["sync", "threads", "asyncio", "processes", "hybrid", "dask"]
BACKEND_NAMES: tuple[BackendName, ...] = typing.get_args(BackendName)
ThumbnailExecutor = Literal["auto", "thread", "process", "inline"]
Match = Literal["", "all", "any"]
EventLoop = Literal["auto", "asyncio"]
Verify = Literal["full", "header"]
ScenarioName = Literal["io", "cpu", "gil", "all"]  # download compare --scenario
InputFormat = Literal["auto", "txt", "csv", "tsv", "json", "jsonl", "parquet"]  # --urls
OutputFormat = Literal["files", "webdataset", "parquet"]
ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
EncodeFormat = Literal["jpg", "png", "webp"]
