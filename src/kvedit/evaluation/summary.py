"""Benchmark summaries from per-case records: means with 95 % intervals, Score, paired comparisons,
and the seed papers' table layout as Markdown and CSV.

A *run* is one method at one setting (layer, batch size); its records are dicts with the case metrics of its
suite's scorer (fractions: `counterfact_case_metrics`, `zsre_case_metrics`, and for the propagation sets
`evaluation.propagation`), plus `time_s` (the edit call's wall time, shared by a batch's cases), `batch_size`
(cases per call) and, where a case edits several facts (MQuAKE), `edits` (requests per call).

The suites (`SUITES`, `Suite`: how each dataset family is read, filtered, scored and tabulated) are in suites.py.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from statistics import harmonic_mean
from typing import Any

import numpy as np

from .comparison import bootstrap_ci, mean_with_ci, paired_comparison
from .suites import EASYEDIT_TITLES, SUITES, Suite


def _score(columns: np.ndarray) -> float:
    """Harmonic mean of column means (× 100); `columns` is `[cases, k]` of fractions."""
    return harmonic_mean((100.0 * columns.mean(0)).tolist())


def summarize_run(records: Sequence[Mapping[str, Any]], suite: Suite, **ci: Any) -> dict[str, Any]:
    """Per metric {"mean", "ci", "count"} (a metric no record has: mean None, never 0), Score with its
    interval, mean and median edit time per call and mean per edit (s), and the number of cases."""
    summary: dict[str, Any] = {"n": len(records), "metrics": {}}
    for metric in suite.metrics:
        values = [r[metric.key] for r in records if r.get(metric.key) is not None]
        summary["metrics"][metric.key] = mean_with_ci(values, metric.scale, **ci)
    scored = [r for r in records if all(r.get(k) is not None for k in suite.score_of)] if suite.score_of else []
    if scored:
        columns = np.array([[r[k] for k in suite.score_of] for r in scored], dtype=float)
        interval = bootstrap_ci(lambda idx: _score(columns[idx]), len(scored), **ci)
        summary["metrics"]["score"] = {
            "mean": _score(columns),
            "ci": list(interval) if interval else None,
            "count": len(scored),
        }
    elif suite.score_of:  # a suite without Score (MQuAKE) has no score entry
        summary["metrics"]["score"] = {"mean": None, "ci": None, "count": 0}
    timed = [r for r in records if r.get("time_s") is not None]
    summary["edit_time_s"] = float(np.mean([r["time_s"] for r in timed])) if timed else None
    summary["edit_time_median_s"] = float(np.median([r["time_s"] for r in timed])) if timed else None
    summary["time_per_edit_s"] = (
        float(np.mean([r["time_s"] / r.get("edits", r.get("batch_size", 1)) for r in timed])) if timed else None
    )
    return summary


def compare_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], suite: Suite, **ci: Any) -> list[dict[str, Any]]:
    """For every pair of runs (a, b) and metric, the paired difference a − b over their shared cases."""
    names = list(runs)
    by_case = {name: {r["case_id"]: r for r in records} for name, records in runs.items()}
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = [c for c in by_case[a] if c in by_case[b]]
            for metric in suite.metrics:
                values = [(by_case[a][c].get(metric.key), by_case[b][c].get(metric.key)) for c in shared]
                pairs = [(x, y) for x, y in values if x is not None and y is not None]
                if not pairs:
                    continue
                result = paired_comparison([x for x, _ in pairs], [y for _, y in pairs], metric.scale, **ci)
                out.append({"a": a, "b": b, "metric": metric.key} | result)
    return out


def _cell(stat: Mapping[str, Any] | None, with_ci: bool) -> str:
    if stat is None or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.2f}"
    if with_ci and stat.get("ci"):
        low, high = stat["ci"]
        text += f" ± {(high - low) / 2:.2f}"
    return text


def markdown_table(summaries: Mapping[str, Mapping[str, Any]], suite: Suite, with_ci: bool = True) -> str:
    """Seed Table 1/3 layout: Method, #Edits (per call), Cases, the suite's `table_keys` (Efficacy, Paraphrase,
    Specificity, Score, then its further columns such as Portability), [Fluency, Consistency when any run has
    them], Time (s per edit call). ± is half the 95 % interval."""
    titles = suite.metric_titles()
    extra = [
        k
        for k in ("fluency", "consistency")
        if any(s["metrics"].get(k, {}).get("mean") is not None for s in summaries.values())
    ]
    keys = [*suite.table_keys(), *extra]
    header = ["Method", "#Edits", "Cases", *(titles.get(k, k) for k in keys), "Time (s)"]
    rows = []
    for name, s in summaries.items():
        time_s = s.get("edit_time_s")
        rows.append(
            [
                name,
                str(s.get("batch_size") or "–"),
                str(s.get("n", "–")),
                *(_cell(s["metrics"].get(k), with_ci) for k in keys),
                "–" if time_s is None else f"{time_s:.2f}",
            ]
        )
    return aligned_markdown(header, rows)


def easyedit_table(summaries: Mapping[str, Mapping[str, Any]], suite: Suite, with_ci: bool = True) -> str | None:
    """The same runs under EasyEdit's definitions (rewrite and rephrase token accuracy, locality as
    unchanged predictions); None when no run has them (e.g. a folder written before they existed)."""
    keys = suite.easyedit
    if keys is None:
        return None
    have = [name for name, s in summaries.items() if s["metrics"].get(keys[-1], {}).get("mean") is not None]
    if not have:
        return None
    header = ["Method", "#Edits", "Cases", *EASYEDIT_TITLES]
    # Cases: how many carry locality (a resumed older folder can have them for part of a run only)
    rows = [
        [
            name,
            str(summaries[name].get("batch_size") or "–"),
            str(summaries[name]["metrics"][keys[-1]]["count"]),
            *(_cell(summaries[name]["metrics"].get(k), with_ci) for k in keys),
        ]
        for name in have
    ]
    return aligned_markdown(header, rows)


def aligned_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)]) + "\n"


def summary_csv(summaries: Mapping[str, Mapping[str, Any]], suite: Suite | None = None) -> str:
    """One row per run and metric: run, method, layer, batch_size, metric, mean, ci_low, ci_high, count,
    edit_time_s, metric_title (the metric's column title in `suite`'s table.md, e.g. Specificity for
    neighborhood_success; last, so readers of the older columns are unaffected)."""
    titles = (
        suite.metric_titles()
        if suite is not None
        else {k: t for s in reversed(list(SUITES.values())) for k, t in s.metric_titles().items()}
    )  # the first's title
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "run",
            "method",
            "layer",
            "batch_size",
            "sequential",
            "metric",
            "mean",
            "ci_low",
            "ci_high",
            "count",
            "edit_time_s",
            "metric_title",
        ]
    )
    for name, s in summaries.items():
        for metric, stat in s["metrics"].items():
            low, high = stat["ci"] if stat.get("ci") else ("", "")
            writer.writerow(
                [
                    name,
                    s.get("method", name),
                    s.get("layer", ""),
                    s.get("batch_size", ""),
                    s.get("sequential", ""),
                    metric,
                    "" if stat["mean"] is None else stat["mean"],
                    low,
                    high,
                    stat["count"],
                    "" if s.get("edit_time_s") is None else s["edit_time_s"],
                    titles.get(metric, ""),
                ]
            )
    return buffer.getvalue()
