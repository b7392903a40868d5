"""Rows from the hub or a local json / jsonl / parquet / csv file, with errors that name the file and line.

Every problem found in a row raises `DataError` naming the file and line (JSONL) or row: `Locator`
turns a row index into that name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import datasets

from rlhf.runtime import ConfigError, atomic_write_text, meant_as_local_path

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ConfigError):
    """Bad input data; the message names the file and the line / row / column."""


class Locator:
    """Names where row i came from: `file: line N` for JSONL files, `file: row i` otherwise."""

    def __init__(self, source: str):
        self.source, self._lines = source, None
        path = Path(source)
        if path.is_file() and path.suffix == ".jsonl":
            with open(path) as fh:
                self._lines = [n for n, line in enumerate(fh, start=1) if line.strip()]

    def __call__(self, i: int) -> str:
        if self._lines is not None and i < len(self._lines):
            return f"{self.source}: line {self._lines[i]}"
        return f"{self.source}: row {i}"


def _json_kind(value) -> str | None:
    """A JSON value's type as one arrow column holds it: ints and floats mix; None and [] fit any column."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    inner = {_json_kind(v) for v in value} - {None}
    return "list of " + " and ".join(sorted(inner)) if inner else None


def _json_error_line(path: Path, columns: Sequence[str] | None = None) -> str | None:
    """The first line of a JSONL file that is not a JSON object, or where a field (of `columns`) changes type."""
    types: dict[str, str] = {}
    with open(path) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}: line {n}: not valid JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"{path}: line {n}: expected a JSON object, got {type(row).__name__}"
            for key, value in row.items():
                kind = _json_kind(value)
                if kind is None or (columns is not None and key not in columns):
                    continue
                if " and " in kind:
                    return f"{path}: line {n}: column `{key}` is a {kind} (a list holds one type)"
                if types.setdefault(key, kind) != kind:
                    return f"{path}: line {n}: column `{key}` is {_a(kind)} here but {_a(types[key])} on earlier lines"
    return None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _mixed_columns(features) -> list[str]:
    """Columns `datasets` stored as `Json`: values of different types, which it no longer tells apart
    (the string "2" reads back as the number 2), so a check on them would blame the wrong line."""

    def mixed(f) -> bool:
        if isinstance(f, datasets.Json):
            return True
        if isinstance(f, dict):
            return any(map(mixed, f.values()))
        return hasattr(f, "feature") and mixed(f.feature)  # List / Sequence / LargeList

    return [c for c, f in features.items() if mixed(f)]


def load_rows(dataset_name: str, split: str = "train", required: Sequence[str] = ()):
    """A `datasets.Dataset` from a hub name or a local json / jsonl / parquet / csv file or directory."""
    path = Path(dataset_name)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per small file is noise next to the training bar
    try:
        if path.is_file():
            if path.suffix not in _LOCAL_FORMATS:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; "
                                f"use one of {', '.join(_LOCAL_FORMATS)}")
            kind = _LOCAL_FORMATS[path.suffix]
            rows = datasets.load_dataset(kind, data_files=str(path), split="train")
            if kind == "csv":  # CSV cells are text: type inference would turn a completion "42" into the integer 42
                rows = rows.cast(datasets.Features({c: datasets.Value("string") for c in rows.column_names}))
        elif path.is_dir():
            rows = datasets.load_dataset(str(path), split=split)
        elif Path(dataset_name).suffix in _LOCAL_FORMATS or meant_as_local_path(dataset_name):
            raise DataError(f"no such data file: {dataset_name}")  # not a hub name: say so, not "cannot reach the hub"
        else:
            rows = datasets.load_dataset(dataset_name, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - arrow / datasets errors are re-raised naming the file (and line)
        located = _json_error_line(path) if path.is_file() and path.suffix in (".json", ".jsonl") else None
        raise DataError(located or f"{dataset_name}: cannot load split {split!r}: {type(e).__name__}: {e}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    mixed = _mixed_columns(rows.features) if hasattr(datasets, "Json") else []
    if mixed:
        located = _json_error_line(path, mixed) if path.is_file() and path.suffix == ".jsonl" else None
        raise DataError(located
                        or f"{dataset_name}: column `{mixed[0]}` holds values of different types in different rows")
    missing = [c for c in required if c not in rows.column_names]
    if missing:
        raise DataError(f"{dataset_name}: missing column `{missing[0]}` (has: {', '.join(rows.column_names)})")
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSONL atomically (temporary name, then rename)."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)
