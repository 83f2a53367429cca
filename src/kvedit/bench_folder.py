"""The files of a `kvedit bench` folder: checking a folder before use, reading and appending cases.jsonl, and
the lines table.md adds under its table (settings, reused target vectors)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class BenchError(ValueError):
    """A bench setting is invalid or conflicts with the run already in the output folder."""


def check_bench_folder(out: str | Path) -> Path:
    """Refuse an output folder that is a file, holds another command's results, or a damaged config.json
    (before anything is loaded or written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is an existing file; expected a folder (new, or a bench folder to resume)")
    config = out / "config.json"
    if config.exists():
        try:
            stored = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BenchError(f"{config} is not valid JSON ({err}); it is not a bench folder kvedit wrote. "
                             "Remove the file or choose another --out") from None
        if not isinstance(stored, dict) or "dataset" not in stored:
            raise BenchError(f"{config} is not a kvedit bench configuration (no 'dataset' key); "
                             "choose another --out")
    elif (out / "cases.jsonl").exists():
        raise BenchError(f"{out} holds a cases.jsonl that kvedit bench did not write (no config.json); "
                         "choose another --out")
    return out


def settings_line(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """One line naming each run's preset row and layers (the full settings are in summary.json)."""
    parts = []
    for name, hp in settings.items():
        layers = hp.get("layers") or []
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}" if layers else ""
        extra = [f"λ {hp['mom2_update_weight']:g}" if "mom2_update_weight" in hp else "",
                 f"lr {hp['lr']:g}" if "target" in hp else ""]
        parts.append(f"{name}: preset {hp.get('preset')}, " + ", ".join(x for x in (where, *extra) if x))
    return "Settings: " + "; ".join(parts) + "." if parts else ""


def reuse_line(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One line naming the runs whose edits took stored target vectors (--reuse-targets), or ""."""
    parts = [f"{name} ({sum('targets_reused_s' in r for r in records)} of {len(records)} cases)"
             for name, records in runs.items() if any("targets_reused_s" in r for r in records)]
    return ("Target vectors served from the cache (optimised by an earlier run with the same settings; the edit "
            "time counts their optimisation time as then measured): " + ", ".join(parts) + ".") if parts else ""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cases_file(path: Path) -> list[dict[str, Any]]:
    """Records of cases.jsonl; a truncated last line (a killed write) is dropped with a warning."""
    if not path.exists():
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
                raise BenchError(f"{path} line {i + 1} is not JSON; the file is damaged") from None
            warnings.warn(f"{path}: dropped a partly written last line (interrupted run)", stacklevel=2)
    return records


def runs_on_file(path: Path) -> set[str]:
    """The run names cases.jsonl holds records of (damaged lines are left to `load_cases_file` to report)."""
    runs = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                runs.add(json.loads(line)["run"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return runs


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines and flush them to disk (a finished batch is never lost).

    A torn last line left by a killed run is cut off first."""
    if not records:
        return
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
