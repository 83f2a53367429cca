"""`kvedit report DIR`: a Markdown report with plots from a `kvedit bench` or `kvedit tune` folder.

A tune folder (its summary.json has a `kind`) is rendered by `kvedit.reports.tune_report.write_tune_report`.

Writes into DIR: report.md, metrics.png (bar chart per metric and run, 95 % intervals), and when
the runs call for them layers.png (metrics against layer, for sweeps), batch_size.png (metrics
against the number of edits per call) and sequential.png (metrics against edits applied so far); for
sequential folders collapse.png and lifelong.md (`kvedit.reports.lifelong_report`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bench.folder import load_cases_file
from ..bench.folder import SEQUENCE_FILE
from ..evaluation.summary import easyedit_table, markdown_table
from ..evaluation.suites import SUITES, Suite, dataset_title
from .lifelong_report import lifelong_section
from .plotting import pyplot


def _plotted_keys(suite: Suite) -> list[str]:
    """The suite's headline metrics (E, P, S; portability or multi-hop where the set has them) and Score."""
    return [*suite.headline, *(["score"] if suite.score_of else [])]


def _titles(suite: Suite) -> dict[str, str]:
    return suite.metric_titles()


def plot_metrics(runs: Mapping[str, Mapping[str, Any]], suite: Suite, path: Path) -> Path:
    """One panel per metric: a bar per run with its 95 % interval."""
    plt = pyplot()
    keys, titles = _plotted_keys(suite), _titles(suite)
    names = list(runs)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 0.35 * len(names) + 2.2), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, key in zip(axes, keys):
        means: list[float] = []
        errors: list[list[float]] = [[], []]
        for name in names:
            stat = runs[name]["metrics"].get(key, {})
            mean = stat.get("mean")
            means.append(mean if mean is not None else 0.0)
            low, high = stat["ci"] if stat.get("ci") and mean is not None else (mean or 0.0, mean or 0.0)
            errors[0].append(max(0.0, (mean or 0.0) - low))
            errors[1].append(max(0.0, high - (mean or 0.0)))
        y = range(len(names))
        ax.barh(list(y), means, xerr=errors, color=[colors(i % 10) for i in y], capsize=3)
        for i, name in enumerate(names):
            if runs[name]["metrics"].get(key, {}).get("mean") is not None:
                ax.text(2, i, f"{means[i]:.1f}", va="center", fontsize=8, color="white", fontweight="bold")
        ax.set_title(titles.get(key, key))
        ax.set_xlim(0, 105)
        ax.grid(axis="x", alpha=0.3)
        ax.invert_yaxis()
    axes[0].set_yticks(list(range(len(names))), names)
    fig.supxlabel("mean × 100 (bars: 95 % bootstrap interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_against(
    runs: Mapping[str, Mapping[str, Any]], suite: Suite, field: str, label: str, path: Path
) -> Path | None:
    """Metrics against `field` (layer or batch_size), one line per method; None if there is no spread."""
    series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for run in runs.values():
        if run.get(field) is not None and run.get("method") != "unedited" and not run.get("sequential"):
            series.setdefault(run["method"], []).append((run[field], run))
    series = {m: sorted(points, key=lambda p: p[0]) for m, points in series.items() if len({p[0] for p in points}) > 1}
    if not series:
        return None
    plt = pyplot()
    keys, titles = _plotted_keys(suite), _titles(suite)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), sharey=True)
    for ax, key in zip(axes, keys):
        for method, points in series.items():
            xs = [x for x, _ in points]
            stats = [run["metrics"].get(key, {}) for _, run in points]
            ys = [s.get("mean") if s.get("mean") is not None else float("nan") for s in stats]
            line = ax.plot(xs, ys, marker="o", label=method)[0]
            lows = [s["ci"][0] if s.get("ci") else y for s, y in zip(stats, ys)]
            highs = [s["ci"][1] if s.get("ci") else y for s, y in zip(stats, ys)]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
        ax.set_title(titles.get(key, key))
        ax.set_xlabel(label)
        ticks = sorted({x for points in series.values() for x, _ in points})
        if field == "batch_size":
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(ticks, [str(int(x)) for x in ticks])
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sequential(records: Sequence[Mapping[str, Any]], suite: Suite, path: Path) -> Path | None:
    """Per sequential run: the new batch's efficacy and the earlier edits' efficacy against edits so far."""
    runs: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get("sequential") and r.get("n_edited") is not None:
            runs.setdefault(r["run"], []).append(r)
    if not runs:
        return None
    plt = pyplot()
    key = suite.score_of[0]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, rs in runs.items():
        by_batch: dict[int, list[Mapping[str, Any]]] = {}
        for r in rs:
            by_batch.setdefault(r["n_edited"], []).append(r)
        xs = sorted(by_batch)
        new = [100 * sum(r[key] for r in by_batch[x]) / len(by_batch[x]) for x in xs]
        earlier = [by_batch[x][0].get("earlier_efficacy", float("nan")) for x in xs]
        line = ax.plot(xs, new, marker="o", label=f"{name}: new batch")[0]
        ax.plot(xs, earlier, linestyle="--", color=line.get_color(), label=f"{name}: earlier edits")
    ax.set_xlabel("edits applied so far")
    ax.set_ylabel("efficacy × 100")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _comparison_table(comparisons: Sequence[Mapping[str, Any]], suite: Suite) -> str:
    keys, titles = suite.headline, _titles(suite)
    lines = [
        "| A | B | Metric | A − B | 95 % interval | A better / worse / tied | sign test p |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        if c["metric"] not in keys or c["mean_difference"] is None:
            continue
        ci = f"[{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" if c.get("ci") else "–"
        p = "–" if c["sign_test_p"] is None else f"{c['sign_test_p']:.3g}"
        lines.append(
            f"| {c['a']} | {c['b']} | {titles[c['metric']]} | {c['mean_difference']:.2f} | {ci} | "
            f"{c['wins']} / {c['losses']} / {c['ties']} | {p} |"
        )
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path) -> Path:
    """Render DIR/report.md and its plots from DIR/summary.json and DIR/cases.jsonl (bench), or from a
    `kvedit tune` folder."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.exists() and (folder / SEQUENCE_FILE).exists():  # a sequential run still going on
        lines = [f"# kvedit bench (sequential, in progress): {folder.name}", "", *lifelong_section(folder)]
        (folder / "report.md").write_text("\n".join(lines) + "\n")
        return folder / "report.md"
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{summary_path} not found; run `kvedit bench --out {folder}` or `kvedit tune --out {folder}` first"
        )
    summary = json.loads(summary_path.read_text())
    if "kind" in summary:
        from .tune_report import write_tune_report

        return write_tune_report(folder)
    suite = SUITES[summary["suite"]]
    runs = summary["runs"]
    info = summary["cases"]
    lines = [f"# kvedit bench: {dataset_title(summary.get('dataset'), summary['suite'])} on {summary['model']}", ""]
    rule = f" ({info['known_rule']})" if info.get("known_rule") else ""
    known = (
        f", {info['known_kept']} of {info['dataset_records']} known to the unedited model{rule}"
        if "known_kept" in info
        else ""
    )
    lines.append(
        f"Dataset `{summary['dataset']}`: {info['cases']} cases{known}. "
        "Means × 100; ± is half the 95 % bootstrap interval; Time is the wall time of one edit call (s)."
    )
    names = ", ".join(f"{_titles(suite)[k]} is `{k}`" for k in suite.table_keys() if k != "score")
    lines.append(
        f"\nIn summary.json and summary.csv: {names}."
        + (" The propagation columns are defined in docs/propagation.md." if suite.reads else "")
    )
    if not summary.get("complete", True):
        lines.append("\n**Incomplete:** some runs have not covered every case yet (resume the bench).")
    lines += ["", markdown_table(runs, suite), "![metrics](metrics.png)", ""]
    if (easyedit := easyedit_table(runs, suite)) is not None:
        lines += [
            "## Under EasyEdit's definitions",
            "",
            "Rewrite and rephrase accuracy: teacher-forced token accuracy of the new target; locality: the "
            "fraction of tokens along each neighborhood prompt's true answer whose prediction the edit left "
            "unchanged. Not comparable with the table above.",
            "",
            easyedit,
        ]
    plot_metrics(runs, suite, folder / "metrics.png")
    for field, label, name in (("layer", "layer", "layers.png"), ("batch_size", "edits per call", "batch_size.png")):
        if plot_against(runs, suite, field, label, folder / name):
            lines += [f"## Metrics against {label}", "", f"![{field}]({name})", ""]
    if plot_sequential(load_cases_file(folder / "cases.jsonl"), suite, folder / "sequential.png"):
        lines += ["## Sequential editing", "", "![sequential](sequential.png)", ""]
    lines += lifelong_section(folder)  # sequential runs: the collapse plot and the table at 100/500/1,000 edits
    if summary.get("comparisons"):
        lines += [
            "## Paired comparisons",
            "",
            "Same cases, per-case differences of A and B; bootstrap interval of the mean difference and an "
            "exact two-sided sign test (ties dropped).",
            "",
            _comparison_table(summary["comparisons"], suite),
        ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
