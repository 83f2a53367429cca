"""Causal tracing over many facts: average indirect effects by token category (ROME Fig. 2), a resumable results
folder, heat maps and curves.

AIE(kind, category, layer) = mean over facts of the restored p(answer), averaged over the category's tokens,
minus the mean corrupted p(answer) of the same facts; ATE = mean clean p − mean corrupted p. Bands are
1.96 × std / √n of the restored probabilities, as ROME's notebook draws them.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.jsonl import jsonl_appender, read_jsonl
from ..data.requests import EditRequest
from ..models.lm import LM
from ..reports.plotting import pyplot
from .causal_trace import KIND_SITES, SAMPLES, WINDOW, FactTrace, embedding_noise_scale, trace_fact

CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
KIND_TITLES = {
    "residual": "single restored layer (residual stream)",
    "ffn": "FFN output (window)",
    "attn": "attention output (window)",
}
FACTS_FILE = "facts.jsonl"


def token_categories(fact: FactTrace) -> dict[str, list[int]]:
    """Token indices of each category. A one-token subject is both its first and last token; a token right after
    the subject that ends the prompt is the last token only."""
    start, end = fact.subject_range
    last = len(fact.tokens) - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end < last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


def average_effects(facts: Sequence[FactTrace]) -> dict[str, Any]:
    """{"facts", "high", "low", "ate", "aie": {kind: {category: {"mean": [L], "band": [L], "facts": n}}}}."""
    if not facts:
        raise ValueError("no traced facts to average")
    low = torch.tensor([f.low for f in facts], dtype=torch.float64)
    high = torch.tensor([f.high for f in facts], dtype=torch.float64)
    result: dict[str, Any] = {
        "facts": len(facts),
        "high": high.mean().item(),
        "low": low.mean().item(),
        "ate": (high - low).mean().item(),
        "aie": {},
    }
    for kind in facts[0].scores:
        per_kind = result["aie"][kind] = {}
        for category in CATEGORIES:
            rows, lows = [], []
            for fact, fact_low in zip(facts, low):
                tokens = token_categories(fact)[category]
                if tokens:
                    rows.append(fact.scores[kind][tokens].mean(0))
                    lows.append(fact_low)
            if not rows:
                continue
            scores = torch.stack(rows)
            band = 1.96 * scores.std(0) / math.sqrt(len(rows)) if len(rows) > 1 else torch.zeros(scores.shape[1])
            per_kind[category] = {
                "mean": (scores.mean(0) - torch.stack(lows).mean()).tolist(),
                "band": band.tolist(),
                "facts": len(rows),
            }
    return result


def peak(effects: Mapping[str, Any], kind: str, category: str = "last subject token") -> tuple[int, float]:
    """(layer, AIE) where `kind`'s effect at `category` is largest."""
    curve = effects["aie"][kind][category]["mean"]
    layer = max(range(len(curve)), key=curve.__getitem__)
    return layer, curve[layer]


def trace_facts(
    lm: LM,
    out: str | Path,
    requests: Sequence[EditRequest],
    n: int,
    samples: int = SAMPLES,
    window: int = WINDOW,
    kinds: Sequence[str] = tuple(KIND_SITES),
    source: str = "",
    progress: bool = True,
) -> list[FactTrace]:
    """Trace requests in order until `n` facts the model predicts are traced, appending each attempt to
    `out/facts.jsonl` (an existing folder with the same settings resumes). ν is 3σ over all requests' subjects."""
    out = Path(out)
    if any(r.target_true is None for r in requests):
        raise ValueError("causal tracing needs each fact's true object (target_true) to check the model knows it")
    nu = embedding_noise_scale(lm, [r.subject for r in requests])
    config = {
        "model": lm.base_fingerprint,
        "source": source,
        "records": len(requests),
        "samples": samples,
        "window": window,
        "kinds": list(kinds),
        "noise": nu,
    }
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "trace_config.json"
    if config_path.exists():
        stored = json.loads(config_path.read_text())
        changed = [k for k in config if k != "noise" and stored.get(k) != config[k]]
        if changed or not math.isclose(stored.get("noise", -1), nu, rel_tol=1e-6):
            raise ValueError(
                f"{out} holds a trace with other settings ({', '.join(changed) or 'noise'}); choose another --out"
            )
    else:
        config_path.write_text(json.dumps(config, indent=1) + "\n")
    done = read_jsonl(out / FACTS_FILE)
    facts = [FactTrace.from_dict(r["fact"]) for r in done if r.get("fact")]
    bar = tqdm(total=n, initial=min(len(facts), n), unit="fact", desc="causal tracing", disable=not progress)
    with jsonl_appender(out / FACTS_FILE) as write:
        for index in range(len(done), len(requests)):
            if len(facts) >= n:
                break
            r = requests[index]
            fact = trace_fact(lm, r.rewrite_prompt, r.subject, nu, r.target_true, kinds, samples, window)
            write({"index": index, "case_id": r.case_id, "fact": fact.to_dict() if fact else None})
            if fact is not None:
                facts.append(fact)
                bar.update(1)
            bar.set_postfix(skipped=index + 1 - len(facts))
    bar.close()
    return facts[:n]


def plot_fact(fact: FactTrace, path: Path) -> Path:
    """Heat maps of one fact: restored p(answer) per token (rows; subject tokens starred) and layer."""
    plt = pyplot()
    kinds = list(fact.scores)
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(4.2 * len(kinds), 0.32 * len(fact.tokens) + 1.6), dpi=110, squeeze=False
    )
    labels = [
        t.strip() + ("*" if fact.subject_range[0] <= i < fact.subject_range[1] else "")
        for i, t in enumerate(fact.tokens)
    ]
    for ax, kind in zip(axes[0], kinds):
        image = ax.imshow(fact.scores[kind].numpy(), aspect="auto", cmap="Purples", vmin=min(fact.low, fact.high))
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(KIND_TITLES[kind], fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05).set_label(f"p({fact.answer.strip()})", fontsize=8)
    fig.suptitle(
        f"{fact.prompt!r} → {fact.answer.strip()!r} (clean {fact.high:.3f}, corrupted {fact.low:.3f})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_average(effects: Mapping[str, Any], path: Path, marks: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Per kind: AIE of each token category against layer (ROME Fig. 2's rows), with bands; `marks` draws the
    layers an editor's preset edits (e.g. {"ROME": [4]})."""
    plt = pyplot()
    kinds = list(effects["aie"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.6), dpi=110, squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for category, curve in effects["aie"][kind].items():
            mean, band = torch.tensor(curve["mean"]), torch.tensor(curve["band"])
            depth = range(len(mean))
            ax.plot(depth, mean, label=category, linewidth=1.8 if "last" in category else 1.0)
            ax.fill_between(depth, mean - band, mean + band, alpha=0.15)
        for (name, layers), style in zip((marks or {}).items(), (":", "--")):
            for layer in layers:
                ax.axvline(layer, color="0.4", linestyle=style, linewidth=0.8)
            ax.plot([], [], color="0.4", linestyle=style, label=f"{name} edits")
        ax.set_title(KIND_TITLES[kind], fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("average indirect effect on p(answer)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Causal tracing over {effects['facts']} facts (ATE {effects['ate']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_trace_results(
    out: Path, facts: Sequence[FactTrace], model: str, marks: Mapping[str, Sequence[int]], plots: int = 3
) -> list[Path]:
    """trace.json, trace.md, aie.csv, aie.png and the first `plots` facts' heat maps; returns the paths."""
    effects = average_effects(facts)
    effects["editor_layers"] = {k: list(v) for k, v in marks.items()}
    (out / "trace.json").write_text(json.dumps(effects, indent=1) + "\n")
    with (out / "aie.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "category", "layer", "aie", "band", "facts"])
        for kind, per_kind in effects["aie"].items():
            for category, curve in per_kind.items():
                for layer, (m, b) in enumerate(zip(curve["mean"], curve["band"])):
                    writer.writerow([kind, category, layer, f"{m:.6f}", f"{b:.6f}", curve["facts"]])
    lines = [
        f"# Causal tracing: {model}",
        "",
        f"{effects['facts']} facts the model predicts; clean p {effects['high']:.4f}, corrupted p "
        f"{effects['low']:.4f}, average total effect {effects['ate']:.4f}.",
        "",
        "| restored | peak layer at the last subject token | AIE there | peak layer at the last token | AIE there |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in effects["aie"]:
        (ls, vs), (lt, vt) = peak(effects, kind), peak(effects, kind, "last token")
        lines.append(f"| {KIND_TITLES[kind]} | {ls} | {vs:.4f} | {lt} | {vt:.4f} |")
    if marks:
        lines += [
            "",
            "Layers the editors' presets for this model edit: "
            + "; ".join(f"{k} {list(v)}" for k, v in marks.items())
            + ".",
        ]
    lines += ["", "![average indirect effects](aie.png)", ""]
    paths = [out / "trace.json", out / "aie.csv", plot_average(effects, out / "aie.png", marks)]
    for i, fact in enumerate(facts[:plots]):
        paths.append(plot_fact(fact, out / f"fact-{i}.png"))
        lines.append(f"![fact {i}](fact-{i}.png)")
    (out / "trace.md").write_text("\n".join(lines) + "\n")
    return [out / "trace.md", *paths]
