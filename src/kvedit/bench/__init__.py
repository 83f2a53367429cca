"""Running experiments: `kvedit bench` and the sweeps behind the presets.

    config      BenchConfig (checked once, when made), RunSpec, the named presets, the suite that scores a dataset
    folder      the bench folder: checked, locked for one process, cases.jsonl read and appended
    harness     Bench: schedules the runs over one folder, resumes, writes the summary
    runner      BatchRunner: edit, score and revert one batch (in this process or a Ray worker)
    ray         the Ray worker pool (`--ray`)
    sequential  the one sequential loop (`edit_in_order`), `sequential_edit`
    selection   the preset sweeps (benchmarks/select_presets.py)
    lines       the lines table.md adds under its table

The main names are imported on first use (`from kvedit.bench import Bench, BenchConfig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .config import BenchConfig, RunSpec
    from .folder import BenchError
    from .harness import Bench

_EXPORTS = {"Bench": ".harness", "BenchConfig": ".config", "BenchError": ".folder", "RunSpec": ".config"}
__all__ = ["Bench", "BenchConfig", "BenchError", "RunSpec"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
