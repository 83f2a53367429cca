"""Each analysis as a results folder: JSONL/CSV + Markdown + PNG, reusing what the folder already holds.

One folder serves every analysis of one model: `triggers.safetensors` (mined once, reused by `layers`,
`inspect` and `all`), `triggers/`, `keys/`, `values/`, `layers.*`, `components.*` and the PNGs.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal


from ..models.ffn_width import ffn_width
from ..models.lm import LM
from .components import component_similarity
from .layers import active_rule, agreement, corpus_statistics, layer_table
from .pages import write_key_pages, write_trigger_jsonl
from .plots import layer_plot
from .triggers import TRIGGERS_FILE, TriggerSet, check_for_model, mine_triggers
from .values import ValueProjection, value_projections, write_value_projections

MINING_SETTINGS = ("source", "max_tokens", "k", "rank", "max_length")


def default_keys(lm: LM, layers: Sequence[int], per_layer: int = 2, seed: int = 0) -> list[tuple[int, int]]:
    """A few (layer, memory) pairs to show: `per_layer` seeded random memories of about four layers spread
    over the depth (the first, the last and two between)."""
    rng = random.Random(seed)
    layers = sorted(layers)
    picked = sorted({layers[round(i * (len(layers) - 1) / 3)] for i in range(4)}) if len(layers) > 1 else layers
    d_ff = ffn_width(lm, picked[0])
    return [(l, i) for l in picked for i in sorted(rng.sample(range(d_ff), min(per_layer, d_ff)))]


def _check_keys(lm: LM, keys: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for layer, key in keys:
        layer = lm.check_layer(layer)
        d_ff = ffn_width(lm, layer)
        if not 0 <= key < d_ff:
            raise ValueError(f"--keys: memory {key} is out of range; layer {layer} has memories 0..{d_ff - 1}")
        out.append((layer, key))
    return out


def triggers_in(folder: str | Path, lm: LM) -> TriggerSet | None:
    """The triggers mined into `folder` for this model, or None if it holds none."""
    if not (Path(folder) / TRIGGERS_FILE).is_file():
        return None
    found = TriggerSet.load(folder)
    check_for_model(found, lm, folder)
    return found


def analyze_triggers(
    lm: LM,
    out: str | Path,
    source: str,
    layers: Sequence[int] | None = None,
    keys: Sequence[tuple[int, int]] = (),
    k: int = 50,
    tokens: int = 100_000,
    max_length: int = 64,
    batch_size: int = 512,
    rank: Literal["value", "abs"] = "value",
    jsonl_examples: int | None = 10,
    progress: bool = True,
    batch_tokens: int | None = 2048,
) -> dict[str, Any]:
    """Mine (or reuse) trigger examples into `out`; write per-layer JSONL (the top `jsonl_examples` per memory;
    None: all k) and one Markdown and one HTML page per key in `keys`, with `keys.md` / `keys.html` indexes."""
    out = Path(out)
    layers = sorted({lm.check_layer(l) for l in (range(lm.num_layers) if layers is None else layers)})
    keys = _check_keys(lm, keys) or default_keys(lm, layers)
    if missing := sorted({l for l, _ in keys} - set(layers)):
        raise ValueError(f"--keys names layers {missing} that are not mined (--layers {layers})")
    found = triggers_in(out, lm)
    settings = {"source": str(source), "max_tokens": tokens, "k": k, "rank": rank, "max_length": max_length}
    if found is not None:
        mined = {s: found.meta.get(s) for s in MINING_SETTINGS}
        if mined != settings or not set(layers) <= set(found.layers):
            raise ValueError(
                f"{out} already holds triggers mined with {mined} for layers {found.layers}; "
                f"asked for {settings} and layers {layers}. Use another --out, or delete {out / TRIGGERS_FILE}"
            )
        reused = True
    else:
        found = mine_triggers(
            lm,
            source,
            layers,
            k=k,
            max_tokens=tokens,
            max_length=max_length,
            batch_size=batch_size,
            rank=rank,
            progress=progress,
            batch_tokens=batch_tokens,
        )
        found.save(out)
        reused = False
    projections = value_projections(lm, sorted({l for l, _ in keys}), progress=False)
    paths = write_trigger_jsonl(lm, found, out, jsonl_examples)
    paths += write_key_pages(lm, found, keys, out, projections)
    return {"reused": reused, "tokens": found.meta.get("tokens"), "layers": found.layers, "files": paths}


def analyze_values(
    lm: LM,
    out: str | Path,
    layers: Sequence[int] | None = None,
    keys: Sequence[tuple[int, int]] = (),
    k: int = 10,
    apply_final_norm: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Value projection of `layers` into `out/values/` and `out/values.md`."""
    layers = sorted({lm.check_layer(l) for l in (range(lm.num_layers) if layers is None else layers)})
    keys = _check_keys(lm, keys)
    projections = value_projections(lm, layers, k, apply_final_norm, progress)
    return {
        "files": write_value_projections(lm, projections, out, keys),
        "final_norm": apply_final_norm,
        "projections": projections,
    }


def _write_table(
    out: Path, name: str, stats: dict[int, dict[str, Any]], header: str, columns: Sequence[str]
) -> list[Path]:
    with (out / f"{name}.jsonl").open("w") as f:
        for layer in sorted(stats):
            f.write(json.dumps({"layer": layer} | stats[layer]) + "\n")
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", *stats[min(stats)]])
        writer.writeheader()
        writer.writerows({"layer": l} | stats[l] for l in sorted(stats))
    (out / f"{name}.md").write_text(header + "\n\n" + layer_table(stats, columns) + "\n")
    return [out / f"{name}.jsonl", out / f"{name}.csv", out / f"{name}.md"]


def analyze_layers(
    lm: LM,
    out: str | Path,
    source: str,
    tokens: int = 2000,
    max_length: int = 64,
    batch_size: int = 8,
    apply_final_norm: bool = False,
    active_threshold: float = 0.1,
    shuffles: int = 10,
    progress: bool = True,
    projections: dict[int, ValueProjection] | None = None,
) -> dict[str, Any]:
    """Agreement (if `out` holds mined triggers), active memories, composition and refinement per layer:
    `layers.jsonl/.csv/.md` and one PNG per statistic. `projections` of every layer, made with the same
    `apply_final_norm`, are reused instead of projected again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    triggers = triggers_in(out, lm)
    layers = list(range(lm.num_layers))
    if (
        projections is None
        or set(projections) != set(layers)
        or any(p.final_norm != apply_final_norm for p in projections.values())
    ):
        projections = value_projections(lm, layers, 1, apply_final_norm, progress)
    stats = corpus_statistics(lm, source, projections, tokens, max_length, batch_size, active_threshold, progress)
    if triggers is not None:
        for layer, row in agreement(triggers, projections, shuffles).items():
            stats[layer] |= row
    norm = "E·norm(v)" if apply_final_norm else "E·v (no final norm)"
    header = (
        f"# Layer statistics: {lm.name}\n\n{stats[0]['tokens']} tokens of {source}; active memory: "
        f"{active_rule(lm, active_threshold)}; values and FFN outputs read as {norm}; logit lens = final norm "
        f"+ unembedding." + ("" if triggers else " No mined triggers in this folder, so no agreement.")
    )
    columns = [
        c
        for c in (
            "agreement",
            "agreement_shuffled",
            "agreement_any",
            "agreement_any_shuffled",
            "shallow",
            "active_mean",
            "active_fraction",
            "composition",
            "lens_top_is_final",
            "lens_prob_final",
            "ffn_changed_top",
        )
        if c in stats[0]
    ]
    files = _write_table(out, "layers", stats, header, columns)
    plots = layer_plots(lm, out, stats, active_threshold)
    return {"stats": stats, "files": files + plots}


def layer_plots(lm: LM, out: Path, stats: dict[int, dict[str, Any]], active_threshold: float) -> list[Path]:
    """One PNG per statistic of `analyze_layers` (agreement and shallow only when `stats` hold them)."""
    col = lambda name: {l: s[name] for l, s in stats.items()}  # noqa: E731
    plots = [
        layer_plot(
            out / "analysis-active.png",
            {"active memories per token": col("active_fraction")},
            "Active memories per token",
            "share of d_ff",
            percent=True,
            note=active_rule(lm, active_threshold),
        ),
        layer_plot(
            out / "analysis-composition.png",
            {"composition": col("composition")},
            "FFN top token predicted by no single active memory",
            "tokens",
            percent=True,
        ),
        layer_plot(
            out / "analysis-refinement.png",
            {
                "lens top = final prediction": col("lens_top_is_final"),
                "lens P(final prediction)": col("lens_prob_final"),
            },
            "Logit lens: residual after each layer vs the final output",
            "rate / probability",
            percent=True,
        ),
    ]
    if not lm.arch.post_norm:
        plots.append(
            layer_plot(
                out / "analysis-ffn-changes.png",
                {"FFN changed the top token": col("ffn_changed_top")},
                "How often the FFN changes the residual's top token",
                "tokens",
                percent=True,
            )
        )
    if "agreement" in stats[min(stats)]:
        plots.append(
            layer_plot(
                out / "analysis-agreement.png",
                {
                    "top trigger example": col("agreement"),
                    "shuffled keys": col("agreement_shuffled"),
                    "any of top-k examples": col("agreement_any"),
                    "any, shuffled keys": col("agreement_any_shuffled"),
                },
                "Value's top token = next token of the key's trigger example",
                "memories",
                percent=True,
                styles=("C0-o", "C0--", "C2-s", "C2--"),
            )
        )
        plots.append(
            layer_plot(
                out / "analysis-shallow.png",
                {"same trigger token": col("shallow")},
                "Share of a key's top examples ending in its most common token",
                "examples",
                percent=True,
            )
        )
    return plots


def counterfact_prompts(
    lm: LM,
    path: str | Path,
    n: int | None = None,
    known_only: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> list[str]:
    """Rewrite prompts of a CounterFact file (any format `load_requests` reads): the first `n`, or with
    `known_only` the first `n` whose true target the model prefers to the new one (P(true) > P(new)).
    The known-fact filter scores `batch_size` cases per step, with a progress bar, and stops once `n` are found."""
    from ..data.loaders import load_requests
    from ..evaluation.known import first_known

    requests = load_requests(path)
    if not known_only:
        return [r.rewrite_prompt for r in requests[:n]]
    if any(r.target_true is None for r in requests):
        raise ValueError(f"{path}: known_only needs target_true for every case")
    kept, _ = first_known(lm, requests, n, batch_size, progress)
    if not kept:
        raise ValueError(
            f"{path}: the model prefers the true object in none of its {len(requests)} cases; "
            "leave out known_only (--known-only)"
        )
    return [r.rewrite_prompt for r in kept]


def analyze_components(
    lm: LM, out: str | Path, prompts: Sequence[str], source_note: str, top: int = 50, progress: bool = True
) -> dict[str, Any]:
    """PMET Fig. 2 over `prompts`: `components.jsonl/.csv/.md`, `analysis-components-cos.png`, `-jaccard.png`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = component_similarity(lm, prompts, top, progress=progress)
    header = (
        f"# Attention vs FFN: {lm.name}\n\n{len(prompts)} prompts ({source_note}); last token; input = the "
        f"normalised hidden state the sub-layer reads, output = what it writes; top-{top} tokens by projection "
        "onto the input embeddings."
    )
    files = _write_table(
        out, "components", stats, header, ["attention_cos", "ffn_cos", "attention_jaccard", "ffn_jaccard"]
    )
    col = lambda name: {l: s[name] for l, s in stats.items()}  # noqa: E731
    files.append(
        layer_plot(
            out / "analysis-components-cos.png",
            {"attention": col("attention_cos"), "FFN": col("ffn_cos")},
            "Cosine similarity of sub-layer input and output",
            "mean cosine",
        )
    )
    files.append(
        layer_plot(
            out / "analysis-components-jaccard.png",
            {"attention": col("attention_jaccard"), "FFN": col("ffn_jaccard")},
            f"Jaccard overlap of input and output top-{top} tokens",
            "mean Jaccard",
        )
    )
    return {"stats": stats, "files": files}
