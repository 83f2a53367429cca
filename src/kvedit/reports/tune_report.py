"""`kvedit report` for a tune folder: report.md with the tables, `targets.png` (accuracy by target set with
95 % intervals) and `loss.png` (training loss per step, one line per target set)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..tuning.tables import METRIC_TITLES, TASK_TITLES, markdown, run_dir_name
from .plotting import pyplot


def _panels(summary: Mapping[str, Any]) -> list[tuple[str, dict[str, Mapping[str, Any]]]]:
    """(title, {run: stat}) per panel: the task average under each metric, or MMLU."""
    runs = summary["runs"]
    if summary["kind"] == "instruct":
        return [("MMLU accuracy (macro over subjects)", {n: r["mmlu"] for n, r in runs.items()})]
    return [(f"Avg: {METRIC_TITLES[m]}", {n: r["average"][m] for n, r in runs.items()}) for m in METRIC_TITLES] + [
        (
            f"{TASK_TITLES.get(t, t)}: {METRIC_TITLES['exact'].split(' (')[0]}",
            {n: r["tasks"][t]["exact"] for n, r in runs.items() if t in r["tasks"]},
        )
        for t in sorted({t for r in runs.values() for t in r["tasks"]})
    ]


def plot_targets(summary: Mapping[str, Any], path: Path) -> Path:
    """One panel per metric (and per task): a bar per target set with its 95 % bootstrap interval."""
    plt = pyplot()
    panels = _panels(summary)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    names = list(summary["runs"])
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, (0.32 * len(names) + 1.4) * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (title, stats) in zip(axes.flat, panels):
        means = [stats.get(n, {}).get("mean") or 0.0 for n in names]
        lows = [m - (stats[n]["ci"][0] if stats.get(n, {}).get("ci") else m) for n, m in zip(names, means)]
        highs = [(stats[n]["ci"][1] if stats.get(n, {}).get("ci") else m) - m for n, m in zip(names, means)]
        ax.barh(
            range(len(names)), means, xerr=[lows, highs], capsize=3, color=[colors(i % 10) for i in range(len(names))]
        )
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.supxlabel("accuracy × 100 (bars: 95 % bootstrap interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(folder: Path, summary: Mapping[str, Any], path: Path, smooth: int = 5) -> Path | None:
    """Training loss per optimiser step (moving average over `smooth` steps); None if nothing was trained."""

    curves = {}
    for name in summary["runs"]:
        train = folder / "runs" / run_dir_name(name) / "train.json"
        losses = json.loads(train.read_text()).get("losses") if train.exists() else None
        if losses:
            curves[name] = losses
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, losses in curves.items():
        k = max(1, min(smooth, len(losses)))
        avg = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), avg, label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"loss per target token (nats, {k}-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tune_report(folder: str | Path) -> Path:
    """Render DIR/report.md, targets.png and loss.png from a `kvedit tune` folder's summary.json."""
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    if not summary.get("runs"):
        raise ValueError(f"{folder}/summary.json has no finished runs yet; run `kvedit tune` to completion first")
    text = markdown(summary)
    plot_targets(summary, folder / "targets.png")
    text += "\n\n![accuracy by target set](targets.png)\n"
    if plot_losses(folder, summary, folder / "loss.png"):
        text += "\n## Training loss\n\n![training loss](loss.png)\n"
    path = folder / "report.md"
    path.write_text(text)
    return path
