"""The lines table.md adds under a bench's table: each run's settings, and the runs that reused target vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def settings_line(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """One line naming each run's preset row and layers (the full settings are in summary.json)."""
    parts = []
    for name, hp in settings.items():
        layers = hp.get("layers") or []
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}" if layers else ""
        extra = [
            f"λ {hp['mom2_update_weight']:g}" if "mom2_update_weight" in hp else "",
            f"lr {hp['lr']:g}" if "target" in hp else "",
        ]
        parts.append(f"{name}: preset {hp.get('preset')}, " + ", ".join(x for x in (where, *extra) if x))
    return "Settings: " + "; ".join(parts) + "." if parts else ""


def reuse_line(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The lines naming the runs whose edits took stored target vectors (--reuse-targets), and those optimised
    ahead in groups (--group-targets), or ""."""

    def counted(key: str) -> list[str]:
        return [
            f"{name} ({sum(key in r for r in records)} of {len(records)} cases)"
            for name, records in runs.items()
            if any(key in r for r in records)
        ]

    reused, grouped = counted("targets_reused_s"), counted("targets_grouped")
    lines = []
    if reused:
        lines.append(
            "Target vectors served from the cache (optimised by an earlier run with the same settings, or ahead "
            "in groups; the edit time counts their optimisation time as then measured): " + ", ".join(reused) + "."
        )
    if grouped:
        size = max(r["targets_grouped"] for records in runs.values() for r in records if "targets_grouped" in r)
        lines.append(
            f"Target vectors optimised ahead in groups of up to {size} requests (--group-targets; the same vectors "
            "as one at a time, in less time per request): the edit time counts each case's share of its group's "
            "time, not a lone edit's: " + ", ".join(grouped) + "."
        )
    return "\n\n".join(lines)
