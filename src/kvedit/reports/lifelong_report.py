"""Reports of sequential (lifelong) bench folders: the collapse plot and the table at 100, 500 and 1,000 edits.

Read from a folder's sequence.jsonl (`kvedit.bench.seqrun`): one record per run and batch, batch -1 being the
unedited model. `kvedit report` adds a "Lifelong editing" section (collapse.png, the table, lifelong.md);
`kvedit compare` puts several folders' tables side by side (lifelong-compare.md).

Intervals drawn: metrics over cases, the stored 95 % percentile bootstrap interval over the sampled cases; label
accuracy, the 95 % Wilson interval over the pooled probe examples; perplexity and weight change have none (one fixed
text slice, one model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bench.folder import SEQUENCE_FILE, sequence_records
from .lifelong_pairs import lifelong_pairs, milestone_rows, pairs_table, samples_digest
from .plotting import pyplot

Stat = Mapping[str, Any] | None

#: (title, how to read a record) of each panel and table column; values × 100 except perplexity and weights
PANELS: tuple[tuple[str, str], ...] = (
    ("Retention: efficacy", "retention.efficacy"),
    ("Retention: paraphrase", "retention.paraphrase"),
    ("Specificity (unrelated facts)", "specificity"),
    ("New batch: efficacy", "new.efficacy"),
    ("Perplexity", "general.perplexity"),
    ("Label accuracy (zero-shot)", "general.label_accuracy.mean"),
    ("max ‖ΔW‖/‖W₀‖ × 100", "weights"),
)


def sequence_runs(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{run: its records in batch order} of a folder's sequence.jsonl ({} when it has none)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for record in sequence_records(Path(folder)):
        runs.setdefault(record["run"], []).append(record)
    return runs


def value(record: Mapping[str, Any], path: str) -> tuple[float | None, list[float] | None]:
    """(mean, [low, high] or None) of one panel's quantity in a record; (None, None) when it was not measured."""
    if path == "weights":
        weights = record.get("weights")
        return (100 * max(w["relative"] for w in weights.values()), None) if weights else (None, None)
    node: Any = record
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
        return node.get("mean"), node.get("ci")
    if node is None:
        return None, None
    ci = record["general"].get("label_ci") if path == "general.label_accuracy.mean" else None
    return float(node), ci


def plot_collapse(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """One panel per quantity against the number of edits, one line per run, shaded intervals; None if no run."""
    panels = [(t, p) for t, p in PANELS if any(value(r, p)[0] is not None for rs in runs.values() for r in rs)]
    if not panels:
        return None
    plt = pyplot()
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, key) in zip(axes.flat, panels):
        for name, records in runs.items():
            points = [(r["n_edited"], *value(r, key)) for r in records if value(r, key)[0] is not None]
            if not points:
                continue
            xs = [p[0] for p in points]
            line = ax.plot(xs, [p[1] for p in points], marker="o", markersize=3, label=name)[0]
            if any(p[2] for p in points):
                lows = [p[2][0] if p[2] else p[1] for p in points]
                highs = [p[2][1] if p[2] else p[1] for p in points]
                ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits applied", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(mean: float | None, ci: list[float] | None, digits: int = 1) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {(ci[1] - ci[0]) / 2:.{digits}f}" if ci else "")


def perplexity_change(records: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> float | None:
    """Perplexity's change in % against the run's record before any edit (batch -1)."""
    base = next((r for r in records if r["batch"] == -1 and "general" in r), None)
    if base is None or "general" not in record:
        return None
    return 100 * (record["general"]["perplexity"] / base["general"]["perplexity"] - 1)


HEADER = (
    "Run",
    "Edits",
    "Retention E",
    "Retention P",
    "Specificity",
    "New E",
    "Perplexity (Δ %)",
    "Label acc",
    "max ‖ΔW‖/‖W₀‖ × 100",
    "Edit s / batch",
    "Eval s / batch",
    "Peak GB",
)


def table_rows(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[list[str]]:
    """The table's rows: every run at each milestone (nearest batch present)."""
    rows = []
    for name, records in runs.items():
        edited = [r for r in records if r["batch"] >= 0]
        mean_edit = sum(r.get("time_s", 0.0) for r in edited) / len(edited) if edited else None
        mean_eval = sum(r.get("eval_s", 0.0) for r in edited) / len(edited) if edited else None
        for _, r in milestone_rows(records):
            peaks = [e["peak_rss_gb"] for e in edited if e["n_edited"] <= r["n_edited"] and "peak_rss_gb" in e]
            ppl, change = value(r, "general.perplexity")[0], perplexity_change(records, r)
            cells = [
                name,
                str(r["n_edited"]),
                *(_fmt(*value(r, key)) for _, key in PANELS[:4]),
                "–" if ppl is None else f"{ppl:.2f}" + ("" if change is None else f" ({change:+.1f})"),
                _fmt(*value(r, "general.label_accuracy.mean")),
                _fmt(value(r, "weights")[0], None, 2),
                _fmt(mean_edit, None, 2),
                _fmt(mean_eval, None, 2),
                _fmt(max(peaks) if peaks else None, None, 2),
            ]
            rows.append(cells)
    return rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


NOTE = (
    "Means × 100 with ± half the 95 % interval (bootstrap over the sampled cases; Wilson over the pooled "
    "examples for label accuracy). Retention: earlier edits' efficacy and paraphrase on a fixed sample; "
    "specificity: the neighbourhood prompts of a fixed sample of cases (unrelated facts); each milestone is the "
    "nearest batch present. Edit and eval s / batch: means over the run's batches. Peak GB: the largest resident "
    "memory of the process(es) that ran the batches up to the milestone."
)


PAIRS_NOTE = (
    "Paired on the same cases (A − B × 100, 95 % bootstrap interval, exact sign test p, cases): retention over the "
    "sampled earlier edits both runs measured, specificity over the same unrelated facts."
)


def lifelong_section(folder: str | Path) -> list[str]:
    """The report's lines for a folder with sequence.jsonl (writes collapse.png and lifelong.md); [] without."""
    folder = Path(folder)
    runs = sequence_runs(folder)
    if not runs:
        return []
    table = markdown(HEADER, table_rows(runs))
    digest = samples_digest(folder)
    pairs = lifelong_pairs([(name, digest, _method(records), records) for name, records in runs.items()])
    if pairs:
        table += f"\n{PAIRS_NOTE}\n\n{pairs_table(pairs)}"
    (folder / "lifelong.md").write_text(f"# Lifelong editing: {folder.name}\n\n{NOTE}\n\n{table}")
    lines = ["## Lifelong editing", "", NOTE, "", table]
    if plot_collapse(runs, folder / "collapse.png"):
        lines += ["![collapse](collapse.png)", ""]
    return lines


def write_lifelong_comparison(
    folders: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """lifelong-compare.md (every folder's table, one column block per folder) and lifelong-compare.json."""
    if labels is not None and len(labels) != len(folders):
        raise ValueError(f"{len(labels)} labels for {len(folders)} folders")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    rows: list[list[str]] = []
    every_run: list[tuple[str, str | None, str | None, list[dict[str, Any]]]] = []
    for i, folder in enumerate(folders):
        runs = sequence_runs(folder)
        if not runs:
            raise FileNotFoundError(
                f"{Path(folder) / SEQUENCE_FILE} not found or empty; expected a folder of `kvedit bench --sequential`"
            )
        label = labels[i] if labels is not None else _label(Path(folder))
        folder_rows = table_rows(runs)
        data[label] = [dict(zip(HEADER, row)) for row in folder_rows]
        rows += [[label, *row] for row in folder_rows]
        digest = samples_digest(folder)
        every_run += [(f"{label}: {name}", digest, _method(records), records) for name, records in runs.items()]
    header = ("Folder", *HEADER)
    text = f"# Lifelong editing side by side\n\n{NOTE}\n\n{markdown(header, rows)}"
    pairs = lifelong_pairs(every_run)
    if pairs:
        text += f"\n{PAIRS_NOTE}\n\n{pairs_table(pairs)}"
        data["paired"] = pairs
    (out / "lifelong-compare.md").write_text(text)
    (out / "lifelong-compare.json").write_text(json.dumps(data, indent=1) + "\n")
    return out / "lifelong-compare.md"


def _label(folder: Path) -> str:
    """model · dataset from the folder's summary.json, else its name."""
    path = folder / "summary.json"
    if not path.is_file():
        return folder.name
    summary = json.loads(path.read_text())
    return f"{Path(str(summary.get('model', '?'))).name} · {Path(str(summary.get('dataset', '?'))).name}"


def _method(records: Sequence[Mapping[str, Any]]) -> str | None:
    """The editor a run's records name (None for records written without one)."""
    return next((r["method"] for r in records if "method" in r), None)
