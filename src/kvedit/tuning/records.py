"""Reading record files (JSONL, JSON list, CSV, TSV) into dicts, with errors that name the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..data.textfiles import read_utf8


class RecordFormatError(ValueError):
    """A record file is not JSONL, a JSON list of objects, CSV or TSV."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of `path` as a dict; the format comes from the suffix (.jsonl/.json/.csv/.tsv) or,
    for other suffixes, from the first character (`[` JSON list, `{` JSON lines)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    text = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        if suffix == ".tsv":  # GLUE TSVs hold unescaped quotes: read fields verbatim
            rows = csv.DictReader(text.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_NONE)
        else:
            rows = csv.DictReader(text.splitlines(), delimiter=delimiter)
        records = [dict(r) for r in rows]
        if rows.fieldnames is None or len(rows.fieldnames) < 2:
            raise RecordFormatError(f"{path}: expected a header row with at least two columns")
        return records
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordFormatError(f"{path}: not valid JSON ({err})") from None
        if not all(isinstance(r, dict) for r in data):
            raise RecordFormatError(f"{path}: expected a JSON list of objects")
        return data
    if stripped[0] == "{" and suffix == ".json":
        try:
            data = json.loads(text)
            return [data] if isinstance(data, dict) else []
        except json.JSONDecodeError:
            pass  # JSON lines with a .json suffix
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordFormatError(
                f"{path} line {i}: not a JSON object ({err.msg}); expected JSON lines, a JSON list, CSV or TSV"
            ) from None
        if not isinstance(record, dict):
            raise RecordFormatError(f"{path} line {i}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
