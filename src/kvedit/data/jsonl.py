"""JSON-lines files that grow as work finishes (bench cases, traced facts, neurons, tuning predictions, sweeps).

One rule for a line a kill cut short: only the last line can be torn (every write ends with a newline), so a
torn last line is dropped when read (with a warning) and cut off before the next append; an unreadable line
anywhere else means the file is damaged (`JsonlError`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol


class JsonlError(ValueError):
    """A line other than the last is not JSON: the file is damaged."""


class RecordWriter(Protocol):
    def __call__(self, record: dict[str, Any]) -> None: ...


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of `path` ([] when it does not exist); a torn last line is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise JsonlError(f"{path} line {i + 1} is not JSON; the file is damaged") from None
            warnings.warn(f"{path}: dropped a partly written last line (interrupted run)", stacklevel=2)
    return records


def cut_torn_tail(path: str | Path) -> None:
    """Cut off an unterminated last line (reading only the file's end), so the next record starts a line."""
    path = Path(path)
    if not path.is_file() or not path.stat().st_size:
        return
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        position = end
        while position > 0:  # back to the last newline, a block at a time
            start = max(0, position - (1 << 16))
            f.seek(start)
            block = f.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            position = start
        f.truncate(0)


@contextmanager
def jsonl_appender(path: str | Path, sync: bool = False) -> Iterator[RecordWriter]:
    """A writer appending one record per call to `path`, flushed at once (`sync`: also to disk); a torn last
    line is cut off first."""
    path = Path(path)
    cut_torn_tail(path)
    with path.open("a") as f:

        def write(record: dict[str, Any]) -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()
            if sync:
                os.fsync(f.fileno())

        yield write


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]], sync: bool = True) -> None:
    """Append `records` as JSON lines in one write, flushed to disk (`sync`): a finished batch is never lost."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not text:
        return
    path = Path(path)
    cut_torn_tail(path)
    with path.open("a") as f:
        f.write(text)
        f.flush()
        if sync:
            os.fsync(f.fileno())
