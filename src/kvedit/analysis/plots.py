"""Line plots of per-layer statistics (matplotlib, Agg backend: files only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..reports.plotting import pyplot


def layer_plot(
    path: str | Path,
    series: Mapping[str, Mapping[int, float]],
    title: str,
    ylabel: str,
    percent: bool = False,
    note: str = "",
    styles: Sequence[str] = ("C0-o", "C1--x", "C2-s", "C3:^"),
) -> Path:
    """One PNG: each series `{label: {layer: value}}` as a line against layer (`styles`: matplotlib format
    strings, one per series)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for (label, values), style in zip(series.items(), list(styles) * 4):
        layers = sorted(l for l, v in values.items() if v == v)  # skip NaN
        ys = [values[l] * (100 if percent else 1) for l in layers]
        ax.plot(layers, ys, style, label=label, markersize=4, linewidth=1.6)
    if all(v >= 0 for values in series.values() for v in values.values() if v == v):
        ax.set_ylim(bottom=0)  # rates and counts: show them against zero
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
