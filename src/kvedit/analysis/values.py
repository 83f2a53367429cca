"""Value projection (Geva et al. 2021): what each FFN value vector promotes, read through the unembedding.

`p_i = softmax(E · v_i)` with the output embedding E and no final norm, as the reference does; with
`apply_final_norm=True`, `E · norm(v_i)` instead (the norm the model applies to its last residual). The
choice is recorded in every output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.lm import LM
from ..models.memory import ffn_memory
from .vocab import project, show, token_strings


@dataclass
class ValueProjection:
    """Top tokens of each value of one layer: `top_ids`, `top_logits` `[d_ff, k]` (best first) for `+v`, and
    `bottom_ids` `[d_ff, k]` for `-v` (what a negative coefficient promotes), `probs` `[d_ff, k]` = softmax mass."""

    layer: int
    final_norm: bool
    top_ids: torch.Tensor
    top_logits: torch.Tensor
    probs: torch.Tensor
    bottom_ids: torch.Tensor


@torch.no_grad()
def value_projection(
    lm: LM, layer: int, k: int = 10, apply_final_norm: bool = False, chunk: int = 256
) -> ValueProjection:
    """Project every value vector of `layer` onto the vocabulary; keep the top `k` tokens of `v` and of `-v`."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    values = ffn_memory(lm, layer).written  # [d_ff, d_model]: what each memory writes (after a post-FFN norm's gain)
    tops, logits, probs, bottoms = [], [], [], []
    for start in range(0, values.shape[0], chunk):
        v = values[start : start + chunk]
        scores = project(lm, v, apply_final_norm)
        top = scores.topk(k, dim=-1)
        tops.append(top.indices)
        logits.append(top.values)
        probs.append(torch.softmax(scores, dim=-1).gather(-1, top.indices))
        # -v: with a final norm, norm(-v) is not -norm(v) when the norm has a bias, so project it
        neg = project(lm, -v, apply_final_norm) if apply_final_norm else -scores
        bottoms.append(neg.topk(k, dim=-1).indices)
    return ValueProjection(
        lm.check_layer(layer),
        apply_final_norm,
        torch.cat(tops).cpu(),
        torch.cat(logits).cpu(),
        torch.cat(probs).cpu(),
        torch.cat(bottoms).cpu(),
    )


def value_projections(
    lm: LM, layers: Sequence[int] | None = None, k: int = 10, apply_final_norm: bool = False, progress: bool = True
) -> dict[int, ValueProjection]:
    """`value_projection` of every layer in `layers` (default all), with a progress bar."""
    layers = sorted({lm.check_layer(l) for l in (range(lm.num_layers) if layers is None else layers)})
    return {
        l: value_projection(lm, l, k, apply_final_norm)
        for l in tqdm(layers, desc="value projection", unit="layer", disable=not progress)
    }


def write_value_projections(
    lm: LM,
    projections: dict[int, ValueProjection],
    out: str | Path,
    keys: Sequence[tuple[int, int]] = (),
    show_top: int = 10,
) -> list[Path]:
    """`values/layer-XX.jsonl` (one line per memory: its top tokens, logits and probabilities) and
    `values.md` (the requested `keys` as (layer, memory) pairs, or the first memories of a few layers)."""
    out = Path(out)
    (out / "values").mkdir(parents=True, exist_ok=True)
    strings = token_strings(lm)
    written = []
    for layer, proj in projections.items():
        path = out / "values" / f"layer-{layer:02d}.jsonl"
        with path.open("w") as f:
            for i in range(proj.top_ids.shape[0]):
                f.write(
                    json.dumps(
                        {
                            "layer": layer,
                            "key": i,
                            "final_norm": proj.final_norm,
                            "top": [strings[t] for t in proj.top_ids[i].tolist()],
                            "logits": [round(x, 4) for x in proj.top_logits[i].tolist()],
                            "probs": [round(x, 6) for x in proj.probs[i].tolist()],
                            "bottom": [strings[t] for t in proj.bottom_ids[i].tolist()],
                        }
                    )
                    + "\n"
                )
        written.append(path)
    norm = (
        "E·norm(v) (final norm applied)"
        if any(p.final_norm for p in projections.values())
        else "E·v (no final norm, as Geva et al.)"
    )
    lines = [
        f"# Value projection: {lm.name}",
        "",
        f"Each value vector v_i is read as {norm}; the top tokens of "
        "+v (what a positive coefficient promotes) and of −v (what a negative one promotes).",
        "",
        "| layer | memory | top tokens of +v | top tokens of −v |",
        "|---:|---:|---|---|",
    ]
    chosen = list(keys) or [(l, i) for l in list(projections)[:: max(1, len(projections) // 4)] for i in range(3)]
    for layer, i in chosen:
        if layer not in projections:
            raise ValueError(f"layer {layer} was not projected; projected layers are {sorted(projections)}")
        proj = projections[layer]
        top = ", ".join(show(strings[t]) for t in proj.top_ids[i, :show_top].tolist())
        bottom = ", ".join(show(strings[t]) for t in proj.bottom_ids[i, :show_top].tolist())
        lines.append(f"| {layer} | {i} | {top} | {bottom} |")
    (out / "values.md").write_text("\n".join(lines) + "\n")
    written.append(out / "values.md")
    return written
