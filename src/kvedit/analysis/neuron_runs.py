"""Knowledge neurons over a fact set: a resumable folder (`neurons.jsonl`, one line per fact), the suppression
check the paper makes (a fact's neurons vs as many random memories), a table and a layer histogram."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..data.jsonl import jsonl_appender, read_jsonl
from ..data.requests import EditRequest
from ..models.lm import LM
from .neurons import BAG_RATIO, STEPS, THRESHOLD, fact_neurons, suppression_effect
from .plots import layer_plot

NEURONS_FILE = "neurons.jsonl"


def find_neurons(
    lm: LM,
    out: str | Path,
    requests: Sequence[EditRequest],
    steps: int = STEPS,
    threshold: float = THRESHOLD,
    bag_ratio: float = BAG_RATIO,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each request's knowledge neurons for its true object, asked by its rewrite prompt and paraphrases, and
    the suppression effect; appended to `out/neurons.jsonl` (a folder with the same settings resumes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": lm.base_fingerprint, "steps": steps, "threshold": threshold, "bag_ratio": bag_ratio}
    settings_path = out / "neurons_config.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"{out} holds knowledge neurons found with other settings; choose another --out")
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")
    records = read_jsonl(out / NEURONS_FILE)
    done = {r["case_id"] for r in records}
    todo = [r for r in requests if r.case_id not in done]
    with jsonl_appender(out / NEURONS_FILE) as write:
        for request in tqdm(todo, desc="knowledge neurons", unit="fact", disable=not progress):
            if request.target_true is None:
                raise ValueError(f"case {request.case_id}: knowledge neurons need the true object (target_true)")
            prompts = [request.rewrite_prompt, *request.paraphrase_prompts]
            fact = fact_neurons(lm, prompts, request.target_true, steps, threshold, bag_ratio)
            record = {
                "case_id": request.case_id,
                "prompts": prompts,
                "answer": request.target_true,
                "neurons": [list(n) for n in fact.neurons],
                "coarse": [len(c) for c in fact.coarse],
                "suppression": suppression_effect(lm, fact, seed=len(records)),
            }
            write(record)
            records.append(record)
    wanted = {r.case_id for r in requests}
    return [r for r in records if r["case_id"] in wanted]


def summarize_neurons(records: Sequence[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    """Counts per fact and per layer, and the mean relative drop of P(answer) when each fact's neurons, or as many
    random memories, are suppressed, with their ratio (facts with neurons only)."""
    counts = [len(r["neurons"]) for r in records]
    effects = [r["suppression"] for r in records if r["suppression"]]
    finite = [e for e in effects if all(math.isfinite(v) for v in e.values())]
    layers = Counter(n[0] for r in records for n in r["neurons"])
    summary: dict[str, Any] = {
        "facts": len(records),
        "facts_with_neurons": len(effects),
        "neurons_per_fact": sum(counts) / len(counts) if counts else None,
        "layers": {l: layers.get(l, 0) for l in range(n_layers)},
    }
    if finite:
        own = sum(e["knowledge"] for e in finite) / len(finite)
        other = sum(e["random"] for e in finite) / len(finite)
        summary |= {"drop_knowledge": own, "drop_random": other, "ratio": own / other if other > 0 else None}
    return summary


def write_neuron_results(out: Path, records: Sequence[dict[str, Any]], model: str, n_layers: int) -> list[Path]:
    """neurons.json, neurons.md and neuron_layers.png; returns their paths."""
    summary = summarize_neurons(records, n_layers)
    (out / "neurons.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# Knowledge neurons: {model}",
        "",
        f"{summary['facts']} facts; {summary['facts_with_neurons']} have knowledge neurons"
        + (f", {summary['neurons_per_fact']:.1f} per fact on average." if records else "."),
    ]
    if "drop_knowledge" in summary:
        ratio = summary["ratio"]
        lines += [
            "",
            "| suppressed (coefficients set to 0 at the last token) | mean relative drop of P(answer) |",
            "|---|---:|",
            f"| the fact's knowledge neurons | {100 * summary['drop_knowledge']:.1f} % |",
            f"| as many random memories | {100 * summary['drop_random']:.1f} % |",
            "",
            f"Ratio: {ratio:.1f}×." if ratio is not None else "Random memories lowered nothing on average.",
        ]
    lines += ["", "![layers](neuron_layers.png)", "", "| case | answer | neurons (layer:memory) |", "|---|---|---|"]
    for r in records[:20]:
        shown = ", ".join(f"{l}:{i}" for l, i, _ in r["neurons"][:8]) + (" …" if len(r["neurons"]) > 8 else "")
        lines.append(f"| {r['case_id']} | {r['answer']} | {shown or '–'} |")
    (out / "neurons.md").write_text("\n".join(lines) + "\n")
    plot = layer_plot(
        out / "neuron_layers.png",
        {"knowledge neurons": summary["layers"]},
        f"Knowledge neurons per layer ({summary['facts']} facts)",
        "neurons",
    )
    return [out / "neurons.md", out / "neurons.json", plot]
