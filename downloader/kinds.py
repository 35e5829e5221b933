"""The enumerations of the dataset settings, in a module of their own that imports
nothing: the settings name them without loading Pillow or pyarrow."""

from __future__ import annotations

from typing import Literal

InputFormat = Literal["auto", "txt", "csv", "tsv", "json", "jsonl", "parquet"]
OutputFormat = Literal["files", "webdataset", "parquet"]
ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
EncodeFormat = Literal["jpg", "png", "webp"]
