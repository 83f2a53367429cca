"""Paired comparisons between sequential runs on the same sampled cases: keys vs values, AlphaEdit vs MEMIT.

Every run of a folder measures retention on the folder's fixed sample of earlier edits (matched here by case id)
and specificity on its fixed unrelated facts (`state/samples.json`), so two runs of one batch size compare case
by case at each edit count both reached. Two folders compare the same way when their samples are the same (same
data set, `--n`, batch size and seed: `samples.json` equal). Differences are A − B × 100 with a 95 % bootstrap
interval and an exact sign test (`evaluation.comparison.paired_comparison`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.comparison import paired_comparison

#: the milestones of the lifelong table and comparisons (number of edits); the nearest batch present stands for each
MILESTONES = (100, 500, 1000)

#: (A, B) by editor: the issue's questions, A the side a paper (or the key-value view) expects to hold up longer
LIFELONG_PAIRS: tuple[tuple[str, str], ...] = (("ft-keys", "ft-values"), ("alphaedit", "memit"))

Records = Sequence[Mapping[str, Any]]


def milestone_rows(
    records: Sequence[Mapping[str, Any]], milestones: Sequence[int] = MILESTONES
) -> list[tuple[int, Mapping[str, Any]]]:
    """(milestone, record) for each milestone: the batch whose edit count is nearest (each batch once)."""
    edited = [r for r in records if r["batch"] >= 0]
    chosen: list[tuple[int, Mapping[str, Any]]] = []
    for m in milestones:
        if not edited:
            break
        best = min(edited, key=lambda r: (abs(r["n_edited"] - m), r["n_edited"]))
        if all(best is not c for _, c in chosen):
            chosen.append((m, best))
    return chosen


def samples_digest(folder: str | Path) -> str | None:
    """SHA-256 of a folder's fixed samples (None when it has none): equal digests, comparable cases."""
    path = Path(folder) / "state" / "samples.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def paired_at_milestones(
    a: Records, b: Records, same_unrelated: bool, milestones: Sequence[int] = MILESTONES, seed: int = 0
) -> list[dict[str, Any]]:
    """For each milestone where both runs have a record with the same edit count: a − b on retention efficacy and
    paraphrase over the earlier edits both sampled, and on specificity when `same_unrelated` (both measured the
    same unrelated facts, in the same order)."""
    b_by_edits = {r["n_edited"]: r for r in b if r["batch"] >= 0}
    rows = []
    for milestone, ra in milestone_rows(a, milestones):
        rb = b_by_edits.get(ra["n_edited"])
        if rb is None or not ra.get("retention_cases") or not rb.get("retention_cases"):
            continue
        index_a = {case: i for i, case in enumerate(ra["retention_cases"])}
        index_b = {case: i for i, case in enumerate(rb["retention_cases"])}
        shared = [case for case in ra["retention_cases"] if case in index_b]
        row: dict[str, Any] = {"milestone": milestone, "n_edited": ra["n_edited"]}
        for key in ("efficacy", "paraphrase"):
            va, vb = ra["retention_values"][key], rb["retention_values"][key]
            row[key] = paired_comparison(
                [va[index_a[c]] for c in shared], [vb[index_b[c]] for c in shared], 100.0, seed=seed
            )
        sa, sb = ra.get("specificity_values"), rb.get("specificity_values")
        if same_unrelated and sa and sb and len(sa) == len(sb):
            row["specificity"] = paired_comparison(sa, sb, 100.0, seed=seed)
        rows.append(row)
    return rows


def _cell(result: Mapping[str, Any] | None) -> str:
    if not result or result.get("mean_difference") is None:
        return "–"
    ci = result["ci"]
    interval = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
    return f"{result['mean_difference']:+.1f}{interval} (p {result['sign_test_p']:.2g}, n {result['count']})"


def pairs_table(pairs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per compared pair and milestone."""
    lines = [
        "| A − B | Edits | Retention E | Retention P | Specificity |",
        "|---|---:|---:|---:|---:|",
    ]
    for pair in pairs:
        for row in pair["rows"]:
            cells = (_cell(row.get(k)) for k in ("efficacy", "paraphrase", "specificity"))
            lines.append(f"| {pair['a']} − {pair['b']} | {row['n_edited']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lifelong_pairs(runs: Sequence[tuple[str, str | None, str | None, Records]], seed: int = 0) -> list[dict[str, Any]]:
    """`runs`: (label, samples digest, method, records) of every run, across one folder or several. Each pair of
    `LIFELONG_PAIRS` is compared wherever an A run and a B run share a batch size and a samples digest."""
    out = []
    for method_a, method_b in LIFELONG_PAIRS:
        for label_a, digest_a, m_a, records_a in runs:
            for label_b, digest_b, m_b, records_b in runs:
                if (m_a, m_b) != (method_a, method_b) or digest_a is None or digest_a != digest_b:
                    continue
                if not records_a or records_a[-1].get("batch_size") != records_b[-1].get("batch_size"):
                    continue
                rows = paired_at_milestones(records_a, records_b, same_unrelated=True, seed=seed)
                if rows:
                    out.append({"a": label_a, "b": label_b, "rows": rows})
    return out
