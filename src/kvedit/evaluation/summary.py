"""Benchmark summaries from per-case records: means with 95 % intervals, Score, paired comparisons,
and the seed papers' table layout as Markdown and CSV.

A *run* is one method at one setting (layer, batch size); its records are dicts with the case metrics of its
suite's scorer (fractions: `counterfact_case_metrics`, `zsre_case_metrics`, and for the propagation sets
`evaluation.propagation`), plus `time_s` (the edit call's wall time, shared by a batch's cases), `batch_size`
(cases per call) and, where a case edits several facts (MQuAKE), `edits` (requests per call).

`SUITES` is the table of dataset families: each row says how its cases are read, filtered ("known"), scored and
tabulated, so adding a set is adding a row.
"""

from __future__ import annotations

import csv
import importlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import harmonic_mean
from types import MappingProxyType
from typing import Any

import numpy as np

from ..data.download import OFFICIAL_DATASETS
from .comparison import bootstrap_ci, mean_with_ci, paired_comparison


@dataclass(frozen=True)
class Metric:
    """A per-case metric: its column title, record key and the factor to its reported unit."""

    title: str
    key: str
    scale: float = 100.0


@dataclass(frozen=True)
class Suite:
    """The metrics of a dataset family and how its cases are read, filtered and scored, so that no code asks
    which dataset it has (as memit pairs each dataset with its evaluator).

    score_of: the success rates whose harmonic mean is Score (none: no Score), the table's first columns;
    columns: further table columns after Score (e.g. portability); compared: the metrics of the paired-comparison
    tables (report.md, `kvedit compare`), default `score_of`; easyedit: the keys of EasyEdit's rewrite accuracy,
    rephrase accuracy and locality (None: no such table); title: how titles name the suite;
    scorer / known: "module:function" in kvedit.evaluation (imported on use) scoring a list of cases, and giving
    per case whether the unedited model knows the fact the edit replaces (`known_rule` says how, for titles);
    reads: the propagation format its cases are read as (`data.propagation`), None for edit requests
    (`load_requests`); generation: cases with generation prompts also get fluency and consistency;
    locality: (argmax key, unchanged key) pairs: a case's argmax ids compared with the unedited run's give
    EasyEdit's locality; needs_target_true / needs_neighborhood_target: what every request must have
    (`bench.config.choose_suite` names a case without it); sequential: whether `--sequential` can run it."""

    name: str
    metrics: tuple[Metric, ...]
    score_of: tuple[str, ...]
    easyedit: tuple[str, str, str] | None = None
    title: str = ""
    scorer: str = ""
    generation: bool = False
    columns: tuple[str, ...] = ()
    compared: tuple[str, ...] = ()
    reads: str | None = None
    known: str = "known:known_filter"
    known_rule: str = "P(target_true) > P(target_new) on the rewrite prompt"
    locality: tuple[tuple[str, str], ...] = (("neighborhood_argmax", "neighborhood_unchanged"),)
    needs_target_true: bool = False
    needs_neighborhood_target: bool = False
    sequential: bool = True

    def case_metrics(self, lm: Any, cases: Sequence[Any]) -> list[dict[str, Any]]:
        """The suite's per-case metrics of `cases` on `lm` as it is now (without generation metrics)."""
        return _function(self.scorer)(lm, cases)

    def known_flags(self, lm: Any, cases: Sequence[Any]) -> list[bool]:
        """Per case: does the unedited `lm` know the fact the edit replaces (`known_rule`)?"""
        return [bool(x) for x in _function(self.known)(lm, cases)]

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics paired comparisons and plots show: `compared`, else `score_of`."""
        return self.compared or self.score_of

    def table_keys(self) -> list[str]:
        """The table's metric columns: `score_of`, Score (when there is one), `columns`."""
        return [*self.score_of, *(["score"] if self.score_of else []), *self.columns]

    def metric_titles(self) -> dict[str, str]:
        """Record key -> column title, e.g. ``neighborhood_success`` -> ``Specificity`` (and ``score`` -> Score)."""
        return {m.key: m.title for m in self.metrics} | {"score": "Score"}


def _function(spec: str) -> Any:
    """The function a "module:function" names in kvedit.evaluation."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"kvedit.evaluation.{module}"), name)


EASYEDIT_TITLES = ("Rewrite acc", "Rephrase acc", "Locality")
_COUNTERFACT = (
    Metric("Efficacy", "efficacy_success"),
    Metric("Paraphrase", "paraphrase_success"),
    Metric("Specificity", "neighborhood_success"),
    Metric("Efficacy magnitude", "efficacy_magnitude"),
    Metric("Paraphrase magnitude", "paraphrase_magnitude"),
    Metric("Specificity magnitude", "neighborhood_magnitude"),
    Metric("Fluency", "fluency"),
    Metric("Consistency", "consistency"),
    Metric("Rewrite acc (EasyEdit)", "efficacy_token_accuracy"),
    Metric("Rephrase acc (EasyEdit)", "paraphrase_token_accuracy"),
    Metric("Locality (EasyEdit)", "neighborhood_unchanged"),
)
_ZSRE = (
    Metric("Efficacy", "efficacy_accuracy"),
    Metric("Paraphrase", "paraphrase_accuracy"),
    Metric("Specificity", "neighborhood_accuracy"),
    Metric("Locality (EasyEdit)", "neighborhood_unchanged"),
)
_CF_SCORE = ("efficacy_success", "paraphrase_success", "neighborhood_success")
_ZSRE_SCORE = ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_accuracy")
_PORTABILITY = Metric("Portability", "portability_accuracy")
#: the portability sets' known rule (`portability.known_by_preference`); False without target_true
_PREFERENCE = "P(target_true) > P(target_new) on the rewrite prompt (no target_true: not known)"

SUITES: Mapping[str, Suite] = MappingProxyType(
    {
        "counterfact": Suite(
            "counterfact",
            _COUNTERFACT,
            _CF_SCORE,
            ("efficacy_token_accuracy", "paraphrase_token_accuracy", "neighborhood_unchanged"),
            "CounterFact",
            scorer="counterfact:counterfact_case_metrics",
            generation=True,
            needs_target_true=True,
        ),
        "zsre": Suite(
            # on zsRE EasyEdit's rewrite and rephrase accuracies are the reference efficacy and paraphrase
            "zsre",
            _ZSRE,
            _ZSRE_SCORE,
            ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_unchanged"),
            "zsRE",
            scorer="zsre:zsre_case_metrics",
            needs_neighborhood_target=True,
        ),
        "counterfact-portability": Suite(
            "counterfact-portability",
            (*_COUNTERFACT, _PORTABILITY),
            _CF_SCORE,
            ("efficacy_token_accuracy", "paraphrase_token_accuracy", "neighborhood_unchanged"),
            "CounterFact portability",
            scorer="propagation:counterfact_portability_case_metrics",
            generation=True,
            columns=("portability_accuracy",),
            compared=(*_CF_SCORE, "portability_accuracy"),
            reads="counterfact-portability",
            known="portability:known_by_preference",
            known_rule=_PREFERENCE,
            needs_target_true=True,
            sequential=False,
        ),
        "zsre-portability": Suite(
            "zsre-portability",
            (*_ZSRE, _PORTABILITY),
            _ZSRE_SCORE,
            ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_unchanged"),
            "zsRE portability",
            scorer="propagation:zsre_portability_case_metrics",
            columns=("portability_accuracy",),
            compared=(*_ZSRE_SCORE, "portability_accuracy"),
            reads="zsre-portability",
            known="portability:known_by_preference",
            known_rule=_PREFERENCE,
            needs_neighborhood_target=True,
            sequential=False,
        ),
        "knowedit": Suite(
            "knowedit",
            (
                Metric("Efficacy", "efficacy_accuracy"),
                Metric("Paraphrase", "paraphrase_accuracy"),
                Metric("Locality", "relation_specificity_unchanged"),
                _PORTABILITY,
                Metric("Reasoning", "reasoning_accuracy"),
                Metric("Subject aliasing", "subject_aliasing_accuracy"),
                Metric("Logical generalisation", "logical_generalization_accuracy"),
                Metric("Relation specificity acc", "relation_specificity_accuracy"),
            ),
            # KnowEdit's own columns: edit success, portability, locality (unchanged predictions: the true answers of
            # the relation-specificity prompts are rarely the argmax of a small model, so their accuracy is near 0)
            ("efficacy_accuracy", "paraphrase_accuracy", "relation_specificity_unchanged"),
            ("efficacy_accuracy", "paraphrase_accuracy", "relation_specificity_unchanged"),
            "KnowEdit",
            scorer="propagation:zsre_portability_case_metrics",
            columns=(
                "portability_accuracy",
                "reasoning_accuracy",
                "subject_aliasing_accuracy",
                "logical_generalization_accuracy",
                "relation_specificity_accuracy",
            ),
            compared=(
                "efficacy_accuracy",
                "paraphrase_accuracy",
                "relation_specificity_unchanged",
                "portability_accuracy",
            ),
            reads="knowedit",
            known="portability:known_by_preference",
            known_rule=_PREFERENCE,
            locality=(("relation_specificity_argmax", "relation_specificity_unchanged"),),
            sequential=False,
        ),
        "mquake": Suite(
            "mquake",
            (
                Metric("Edit-wise", "efficacy_success"),
                Metric("Single-hop", "single_hop_accuracy"),
                Metric("Multi-hop", "multihop_accuracy"),
                Metric("Multi-hop (old answer)", "multihop_old_accuracy"),
                Metric("Single-hop prob.", "single_hop_prob_accuracy"),
                Metric("Multi-hop prob.", "multihop_prob_accuracy"),
                Metric("Multi-hop prob. (any)", "multihop_prob_any"),
                Metric("NLL margin (nats)", "multihop_nll_margin", scale=1.0),
            ),
            (),
            None,
            "MQuAKE",
            scorer="propagation:mquake_case_metrics",
            columns=(
                "efficacy_success",
                "single_hop_accuracy",
                "multihop_accuracy",
                "multihop_old_accuracy",
                "single_hop_prob_accuracy",
                "multihop_prob_accuracy",
                "multihop_nll_margin",
            ),
            compared=("efficacy_success", "single_hop_accuracy", "multihop_accuracy", "multihop_prob_accuracy"),
            reads="mquake",
            known="multihop:known_multihop",
            known_rule="the unedited model prefers the old answer to the new one (lower NLL) on one of the questions",
            locality=(),
            needs_target_true=True,
            sequential=False,
        ),
    }
)


def dataset_title(dataset: str | None, suite: str) -> str:
    """How titles name a bench's data: a built-in name as it is ("counterfact", "zsre"), a file by its name
    and the suite that scored it ("my_facts.json, CounterFact metrics"); without a dataset (an old summary),
    the suite's name."""
    if not dataset:
        return suite
    name = Path(str(dataset)).name
    if name == str(dataset) and name in OFFICIAL_DATASETS:
        return name
    titled = SUITES[suite].title if suite in SUITES else suite
    return f"{name}, {titled} metrics"


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
