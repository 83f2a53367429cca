"""Summaries of a tune folder: per-task accuracy with 95 % bootstrap intervals, macro-F1, the task average,
trainable parameters, time and memory; paired comparisons of target sets on the same test examples; the seed's
Table 2 layout as Markdown and CSV.

Metrics per classification run: `exact` (greedy continuation equals the label text, the seed's metric) and
`rank` (the label word with the highest likelihood is the gold one). MMLU runs: accuracy macro-averaged over
subjects.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.jsonl import read_jsonl
from ..evaluation.comparison import bootstrap_ci, mean_with_ci, paired_comparison
from ..evaluation.summary import aligned_markdown
from .evaluate import accuracy_and_f1
from .instruct import macro_accuracy

METRICS = {"exact": ("generated", "exact"), "rank": ("ranked", "rank_correct")}
METRIC_TITLES = {
    "exact": "exact match of the greedy answer (the seed's metric)",
    "rank": "label words ranked by likelihood",
}
TASK_TITLES = {"20ng": "20NG", "boolq": "BoolQ", "cb": "CB", "copa": "COPA", "race": "RACE", "qnli": "QNLI"}


def _task_average(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Mean over tasks of each task's accuracy (× 100), with a bootstrap interval over examples."""
    tasks = sorted({r["task"] for r in records})
    codes = np.array([tasks.index(r["task"]) for r in records])
    hits = np.array([r[key] for r in records], dtype=float)

    def average(idx: np.ndarray) -> float:
        sums = np.bincount(codes[idx], weights=hits[idx], minlength=len(tasks))
        counts = np.bincount(codes[idx], minlength=len(tasks))
        return float(100 * (sums[counts > 0] / counts[counts > 0]).mean())

    ci = bootstrap_ci(average, len(records))
    return {"mean": average(np.arange(len(records))), "ci": list(ci) if ci else None, "count": len(records)}


def summarize_classification(records: Sequence[Mapping[str, Any]], labels: Mapping[str, Sequence[str]]) -> dict:
    """Per task and metric: accuracy (mean × 100, ci, count) and macro-F1 (× 100); the task average."""
    out: dict[str, Any] = {"tasks": {}, "average": {}}
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task]
        out["tasks"][task] = {}
        for metric, (field, hit) in METRICS.items():
            stat = mean_with_ci([r[hit] for r in rows], 100.0)
            f1 = accuracy_and_f1([r["gold"] for r in rows], [r[field] for r in rows], labels.get(task, ()))
            out["tasks"][task][metric] = stat | {"macro_f1": 100 * f1["macro_f1"]}
    for metric, (_, hit) in METRICS.items():
        out["average"][metric] = _task_average(records, hit)
    return out


def compare_pairs(by_run: Mapping[str, Sequence[Mapping[str, Any]]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """For each pair of runs and metric key: paired difference (× 100) over shared examples (uid)."""
    names = list(by_run)
    index = {n: {r["uid"]: r for r in rs} for n, rs in by_run.items()}
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = [u for u in index[a] if u in index[b]]
            for key in keys:
                result = paired_comparison(
                    [index[a][u][key] for u in shared], [index[b][u][key] for u in shared], 100.0
                )
                out.append({"a": a, "b": b, "metric": key} | result)
    return out


def run_dir_name(name: str) -> str:
    """A target set's folder name under runs/ (characters outside [A-Za-z0-9_.+-] become _)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def summarize_tune(folder: str | Path, kind: str) -> dict[str, Any]:
    """The summary of a tune folder from `predictions.jsonl`, `runs/*/train.json` and `config.json`."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    records: dict[str, list[dict[str, Any]]] = {}
    for r in read_jsonl(folder / "predictions.jsonl"):
        records.setdefault(r["run"], []).append(r)
    order = [n for n in config["targets"] if n in records]
    labels = {n: t["labels"] for n, t in config["data"]["tasks"].items()}
    runs: dict[str, Any] = {}
    for name in order:
        train_path = folder / "runs" / run_dir_name(name) / "train.json"
        train = json.loads(train_path.read_text()) if train_path.exists() else {}
        run: dict[str, Any] = {
            k: train.get(k)
            for k in (
                "trainable",
                "total",
                "steps",
                "tokens",
                "train_time_s",
                "tokens_per_s",
                "eval_time_s",
                "peak_memory_mb",
            )
        }
        run["share"] = 100 * run["trainable"] / run["total"] if run.get("total") else None
        run["final_loss"] = float(np.mean(train["losses"][-10:])) if train.get("losses") else None
        if kind == "instruct":
            run["mmlu"] = macro_accuracy(records[name])
        else:
            run |= summarize_classification(records[name], labels)
        runs[name] = run
    keys = ["correct"] if kind == "instruct" else ["exact", "rank_correct"]
    complete = set(order) == set(config["targets"])
    return {
        "kind": kind,
        "model": config["model"],
        "data": config["data"],
        "train_config": config["train_config"],
        "layers": config.get("layers"),
        "runs": runs,
        "complete": complete,
        "comparisons": compare_pairs({n: records[n] for n in order}, keys),
    }


def _cell(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.1f}"
    if stat.get("ci"):
        text += f" ± {(stat['ci'][1] - stat['ci'][0]) / 2:.1f}"
    return text


def _cost_cells(run: Mapping[str, Any]) -> list[str]:
    trainable = "0" if not run.get("trainable") else f"{run['trainable'] / 1e6:.2f}M ({run['share']:.3f} %)"
    minutes = "–" if run.get("train_time_s") is None else f"{run['train_time_s'] / 60:.1f}"
    memory = "–" if run.get("peak_memory_mb") is None else f"{run['peak_memory_mb']:.0f}"
    return [trainable, minutes, memory]


def table2(summary: Mapping[str, Any], metric: str = "exact") -> str:
    """Seed Table 2 layout: Target, trainable parameters (share), one column per task, Avg, train time, memory.
    Accuracy × 100; ± is half the 95 % bootstrap interval."""
    runs = summary["runs"]
    if summary["kind"] == "instruct":
        header = ["Target", "Trainable (share)", "MMLU (macro)", "MMLU (micro)", "Train (min)", "Peak MB"]
        rows = [
            [n, _cost_cells(r)[0], _cell(r["mmlu"]), f"{r['mmlu']['micro']:.1f}", *_cost_cells(r)[1:]]
            for n, r in runs.items()
        ]
        return aligned_markdown(header, rows)
    tasks = sorted({t for r in runs.values() for t in r["tasks"]})
    header = ["Target", "Trainable (share)", *(TASK_TITLES.get(t, t) for t in tasks), "Avg", "Train (min)", "Peak MB"]
    rows = [
        [
            n,
            _cost_cells(r)[0],
            *(_cell(r["tasks"].get(t, {}).get(metric)) for t in tasks),
            _cell(r["average"][metric]),
            *_cost_cells(r)[1:],
        ]
        for n, r in runs.items()
    ]
    return aligned_markdown(header, rows)


def f1_table(summary: Mapping[str, Any], metric: str) -> str:
    runs = summary["runs"]
    tasks = sorted({t for r in runs.values() for t in r["tasks"]})
    rows = [
        [n, *(f"{r['tasks'][t][metric]['macro_f1']:.1f}" if t in r["tasks"] else "–" for t in tasks)]
        for n, r in runs.items()
    ]
    return aligned_markdown(["Target", *(TASK_TITLES.get(t, t) for t in tasks)], rows)


def comparison_table(comparisons: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]] | None = None) -> str:
    """Paired differences A − B (× 100) with bootstrap interval and sign test; `pairs` restricts the rows."""
    rows = []
    for c in comparisons:
        if pairs is not None and (c["a"], c["b"]) not in pairs and (c["b"], c["a"]) not in pairs:
            continue
        if c["mean_difference"] is None:
            continue
        ci = f"[{c['ci'][0]:.1f}, {c['ci'][1]:.1f}]" if c.get("ci") else "–"
        p = "–" if c["sign_test_p"] is None else f"{c['sign_test_p']:.3g}"
        rows.append(
            [
                c["a"],
                c["b"],
                c["metric"],
                f"{c['mean_difference']:+.1f}",
                ci,
                f"{c['wins']} / {c['losses']} / {c['ties']}",
                p,
                str(c["count"]),
            ]
        )
    return aligned_markdown(
        ["A", "B", "metric", "A − B", "95 % interval", "A better / worse / tied", "sign test p", "examples"], rows
    )


def summary_csv(summary: Mapping[str, Any]) -> str:
    """One row per run, task and metric: run, task, metric, mean, ci_low, ci_high, count, macro_f1, trainable,
    share, train_time_s, peak_memory_mb."""
    buffer = io.StringIO()
    w = csv.writer(buffer, lineterminator="\n")
    w.writerow(
        [
            "run",
            "task",
            "metric",
            "mean",
            "ci_low",
            "ci_high",
            "count",
            "macro_f1",
            "trainable",
            "share",
            "train_time_s",
            "peak_memory_mb",
        ]
    )
    for name, r in summary["runs"].items():
        cost = [r.get("trainable"), r.get("share"), r.get("train_time_s"), r.get("peak_memory_mb")]
        cells = (
            [("mmlu", "macro_accuracy", r["mmlu"])]
            if summary["kind"] == "instruct"
            else [(t, m, s) for t, by in r["tasks"].items() for m, s in by.items()]
            + [("average", m, s) for m, s in r["average"].items()]
        )
        for task, metric, s in cells:
            low, high = s["ci"] if s.get("ci") else ("", "")
            w.writerow(
                [
                    name,
                    task,
                    metric,
                    s["mean"],
                    low,
                    high,
                    s["count"],
                    s.get("macro_f1", ""),
                    *("" if v is None else v for v in cost),
                ]
            )
    return buffer.getvalue()


def markdown(summary: Mapping[str, Any]) -> str:
    """table.md: the Table 2 layout(s), macro-F1, and the paired comparisons."""
    data = summary["data"]
    lines = [f"# kvedit tune on {summary['model']}", ""]
    cfg = summary["train_config"]
    lines.append(
        f"Preset `{cfg['preset']}`: {cfg['adapter']} r {cfg['rank']}, lr {cfg['lr']}, {data['train']} training "
        f"examples, {cfg['batch_size']}×{cfg['grad_accum']} sequences per step, max length {cfg['max_length']}, "
        f"loss on {cfg['loss_on']}. Accuracy × 100; ± is half the 95 % bootstrap interval."
    )
    for name, t in (data.get("tasks") or {}).items():
        lines.append(f"- {TASK_TITLES.get(name, name)}: {t['train']} train / {t['test']} test ({t['note']})")
    if not summary["complete"]:
        lines.append("\n**Incomplete:** some target sets have not finished (run the same command again to resume).")
    if summary["kind"] == "instruct":
        lines += [
            "",
            table2(summary),
            "",
            "## Paired comparisons (per question correct)",
            "",
            comparison_table(summary["comparisons"]),
        ]
        return "\n".join(lines)
    for metric in METRICS:
        lines += [
            "",
            f"## Accuracy: {METRIC_TITLES[metric]}",
            "",
            table2(summary, metric),
            "",
            "Macro-F1:",
            "",
            f1_table(summary, metric),
        ]
    lines += [
        "## Paired comparisons",
        "",
        "Same test examples; per-example correctness of A minus B; bootstrap "
        "interval of the mean difference; exact two-sided sign test (ties dropped).",
        "",
        comparison_table(summary["comparisons"]),
    ]
    return "\n".join(lines)


def write_tables(folder: str | Path, summary: Mapping[str, Any]) -> None:
    folder = Path(folder)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    (folder / "summary.csv").write_text(summary_csv(summary))
    (folder / "table.md").write_text(markdown(summary))
