"""`kvedit compare DIR... --out OUT`: the same paired comparisons side by side across bench folders
(one folder per model and dataset), to see which claims hold where.

For each pair of runs (A, B) and each of the suite's headline metrics (`Suite.headline`: efficacy, paraphrase,
specificity, and portability or the multi-hop metrics on the propagation sets), the paired difference A − B over
a folder's shared cases is read from its summary.json (bootstrap 95 % interval, exact sign test), turned round
when the folder stored it as B − A; rows are matched by metric title across folders. Writes to OUT: compare.md (a
table, one column per folder; then every run's headline metrics and Score side by side), compare.json (the same
numbers) and compare.png (a forest plot: one panel per pair and metric, one bar per folder).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.suites import SUITES, dataset_title
from .plotting import pyplot

#: The seed papers' comparisons (A, B), A the method a paper says is better: keys vs values (Qiu et al. 2024),
#: PMET vs MEMIT one at a time and 100 at once, PMET vs each of its ablations (Li et al. 2024), MEMIT vs ROME.
SEED_PAIRS: tuple[tuple[str, str], ...] = (
    ("ft-keys", "ft-values"),
    ("pmet", "memit"),
    ("pmet x100", "memit x100"),
    ("pmet", "pmet-no-attn-delta"),
    ("pmet", "pmet-update-attn"),
    ("pmet", "pmet-even-spread"),
    ("memit", "rome"),
)


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """ "a:b,c:d" -> (("a", "b"), ("c", "d")); run names as the bench tables print them (e.g. "memit x100")."""
    pairs = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--pairs: {item!r} is not A:B (two run names joined by ':')")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def _reversed(c: Mapping[str, Any]) -> dict[str, Any]:
    """B − A from a stored A − B comparison."""
    ci = c.get("ci")

    def neg(x: float) -> float:
        return 0.0 - x  # not -x: a zero difference stays 0.0, never -0.0

    return {
        **c,
        "a": c["b"],
        "b": c["a"],
        "mean_difference": neg(c["mean_difference"]),
        "ci": [neg(ci[1]), neg(ci[0])] if ci else None,
        "wins": c["losses"],
        "losses": c["wins"],
    }


def folder_comparisons(summary: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """{"A|B|Metric title": comparison} for the requested pairs found in one bench summary."""
    suite = SUITES[summary["suite"]]
    titles = {key: suite.metric_titles()[key] for key in suite.headline}
    stored = {
        (c["a"], c["b"], c["metric"]): c
        for c in summary.get("comparisons", ())
        if c["metric"] in titles and c.get("mean_difference") is not None
    }
    found = {}
    for a, b in pairs:
        for metric, title in titles.items():
            if (a, b, metric) in stored:
                found[f"{a}|{b}|{title}"] = dict(stored[a, b, metric])
            elif (b, a, metric) in stored:
                found[f"{a}|{b}|{title}"] = _reversed(stored[b, a, metric])
    return found


def folder_runs(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{run: {"Efficacy": mean, "Paraphrase": …, "Specificity": …, [further headline metrics, e.g. "Portability"],
    "Score": … (when the suite has one), "n": cases scored}} × 100 from one bench summary, in the folder's run
    order; a metric the run lacks is None."""
    suite = SUITES[summary["suite"]]
    titles = suite.metric_titles()
    keys = [*suite.headline, *(["score"] if suite.score_of else [])]
    runs = {}
    for name, run in summary.get("runs", {}).items():
        metrics = run.get("metrics", {})
        runs[name] = {titles[key]: metrics.get(key, {}).get("mean") for key in keys} | {"n": run.get("n")}
    return runs


def _legend(suite_name: str) -> str:
    """What a run cell of a folder of this suite lists, e.g. "Efficacy / Paraphrase / Specificity (Score)"."""
    suite = SUITES[suite_name]
    titles = suite.metric_titles()
    return " / ".join(titles[k] for k in suite.headline) + (" (Score)" if suite.score_of else "")


def _run_cell(run: Mapping[str, Any] | None, cases: int | None) -> str:
    """ "E / P / S (Score)" (the run's headline metrics in order, Score when it has one), with the case count when
    it falls short of the folder's."""
    if run is None:
        return "–"

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    short = f"{run['n']} of {cases} cases" if cases and run.get("n") is not None and run["n"] < cases else ""
    text = " / ".join(f(v) for k, v in run.items() if k not in ("Score", "n"))
    if "Score" in run:
        return text + f" ({f(run['Score'])}{', ' + short if short else ''})"
    return text + (f" ({short})" if short else "")


def _label(summary: Mapping[str, Any]) -> str:
    model = Path(str(summary.get("model", "?"))).name
    return f"{model} · {dataset_title(summary.get('dataset'), summary['suite'])}"


def _cell(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return "–"
    ci = f" [{c['ci'][0]:.1f}, {c['ci'][1]:.1f}]" if c.get("ci") else ""
    p = "" if c.get("sign_test_p") is None else f", p {c['sign_test_p']:.2g}"
    return f"{c['mean_difference']:+.1f}{ci}{p}"


def write_comparison(
    folders: Sequence[str | Path],
    out: str | Path,
    pairs: Sequence[tuple[str, str]] = SEED_PAIRS,
    labels: Sequence[str] | None = None,
    strict: bool = False,
) -> Path:
    """Compare `pairs` across bench `folders` (labelled by model and dataset unless `labels` are given);
    returns the path of compare.md. `strict`: every run the pairs name must be in some folder (pairs a user
    typed); otherwise pairs absent everywhere are left out. Raises ValueError when no pair is found at all."""
    if labels is not None and len(labels) != len(folders):
        raise ValueError(f"{len(labels)} labels for {len(folders)} folders")
    columns: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    cases: dict[str, int | None] = {}
    titles: list[str] = []  # every folder's headline metric titles, in order of first appearance
    suites: list[str] = []
    for i, folder in enumerate(folders):
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected a kvedit bench folder (run `kvedit bench` first)")
        summary = json.loads(path.read_text())
        if "suite" not in summary:
            raise ValueError(f"{path} is not a kvedit bench summary (a tune folder?)")
        label = labels[i] if labels is not None else _label(summary)
        if label in columns:
            label = f"{label} ({folder})"
        suite = SUITES[summary["suite"]]
        titles += [t for t in (suite.metric_titles()[k] for k in suite.headline) if t not in titles]
        suites += [summary["suite"]] if summary["suite"] not in suites and summary.get("runs") else []
        columns[label] = folder_comparisons(summary, pairs)
        runs[label] = folder_runs(summary)
        cases[label] = (summary.get("cases") or {}).get("cases")  # the folder's case count
    rows = [f"{a}|{b}|{t}" for a, b in pairs for t in titles if any(f"{a}|{b}|{t}" in col for col in columns.values())]
    known = list(dict.fromkeys(name for col in runs.values() for name in col))
    missing = [name for name in dict.fromkeys(x for pair in pairs for x in pair) if name not in known]
    if (strict and missing) or not rows:
        what = f"no folder has a run named {', '.join(map(repr, missing))}" if missing else "no folder compares them"
        raise ValueError(
            f"pairs {', '.join(f'{a}:{b}' for a, b in pairs)}: {what}; the folders' runs are "
            f"{', '.join(map(repr, known)) or 'none'}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| A − B | Metric | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        a, b, title = row.split("|")
        lines.append(f"| {a} − {b} | {title} | " + " | ".join(_cell(col.get(row)) for col in columns.values()) + " |")
    names = list(dict.fromkeys(name for col in runs.values() for name in col))
    run_lines = ["| Run | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    run_lines += [
        f"| {name} | " + " | ".join(_run_cell(runs[label].get(name), cases[label]) for label in runs) + " |"
        for name in names
    ]
    text = (
        "Paired differences A − B × 100 over each folder's shared cases: mean [bootstrap 95 % interval], "
        "exact sign-test p.\n\n" + "\n".join(lines) + "\n\n![compare](compare.png)\n\n"
        "Every run side by side, × 100"
        + "".join(f"; {SUITES[s].title}: {_legend(s)}" for s in suites)
        + ".\n\n"
        + "\n".join(run_lines)
        + "\n"
    )
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(
        json.dumps({"folders": [str(f) for f in folders], "columns": columns, "runs": runs}, indent=1) + "\n"
    )
    _plot(columns, rows, [t for t in titles if any(r.endswith(f"|{t}") for r in rows)], out / "compare.png")
    return out / "compare.md"


def _plot(
    columns: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Sequence[str], titles: Sequence[str], path: Path
) -> None:
    """One panel per (pair, metric): each folder's mean difference with its interval; 0 marked."""
    plt = pyplot()
    pairs = list(dict.fromkeys(r.rsplit("|", 1)[0] for r in rows))
    fig, axes = plt.subplots(
        max(1, len(pairs)),
        len(titles),
        squeeze=False,
        figsize=(4 * len(titles), 0.5 + 0.45 * len(columns) * max(1, len(pairs))),
    )
    labels = list(columns)
    for i, pair in enumerate(pairs):
        for j, title in enumerate(titles):
            ax = axes[i][j]
            for y, label in enumerate(labels):
                c = columns[label].get(f"{pair}|{title}")
                if c is None:
                    continue
                lo, hi = c["ci"] if c.get("ci") else (c["mean_difference"],) * 2
                ax.errorbar(
                    c["mean_difference"],
                    y,
                    xerr=[[c["mean_difference"] - lo], [hi - c["mean_difference"]]],
                    fmt="o",
                    capsize=3,
                )
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set_yticks(range(len(labels)), labels if j == 0 else [""] * len(labels), fontsize=8)
            ax.set_ylim(len(labels) - 0.5, -0.5)  # the first folder on top
            if i == len(pairs) - 1:
                ax.set_xlabel("A − B (percentage points)", fontsize=8)
            ax.set_title(f"{pair.replace('|', ' − ')}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
