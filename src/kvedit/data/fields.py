"""Typed access to a data record's (possibly nested) fields, for the loaders: a problem says which key and what was
expected, and the loader adds the file, record and case."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RecordProblem(Exception):
    """What is wrong with one record (the loader prefixes where it is)."""


def field(record: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...] = str) -> Any:
    """`record["a"]["b"]` for ``dotted="a.b"``, checked to be of type `kind` (a bool is never an int)."""
    value: Any = record
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(value, dict):
            raise RecordProblem(f"key {'.'.join(parts[:depth])!r} should be an object, got {type(value).__name__}")
        if part not in value:
            raise RecordProblem(f"missing key {'.'.join(parts[: depth + 1])!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordProblem(f"key {dotted!r} should be {names}, got {type(value).__name__} {value!r:.80}")
    return value


def strings(record: Mapping[str, Any], dotted: str) -> tuple[str, ...]:
    """The list of strings under `dotted`."""
    value = field(record, dotted, list)
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise RecordProblem(f"key '{dotted}[{j}]' should be str, got {type(item).__name__}")
    return tuple(value)
