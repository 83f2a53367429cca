"""One prompt through the key-value lens: the memories that contribute most at its last token, their
value tokens and trigger examples, the logit lens per layer, and interventions on single memories."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..models.lm import LM
from ..models.memory import ffn_memory
from ..models.tracing import Scaling, Trace
from .triggers import TriggerSet
from .vocab import logit_lens, project, token_strings

#: the largest |factor| an intervention accepts: far past any factor that reads as "this memory, stronger", and
#: far below what overflows a forward pass (a factor of 1e308 turns the output into NaN)
MAX_FACTOR = 1e4


@dataclass(frozen=True)
class Intervention:
    """Multiply memory `key` of `layer` by `factor` at every position (0 switches it off).

    `factor` must be a finite number with |factor| <= MAX_FACTOR; anything else raises ValueError."""

    layer: int
    key: int
    factor: float

    def __post_init__(self) -> None:
        where = f"memory {self.layer}:{self.key}"
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise ValueError(f"the factor of {where} must be a number, got {self.factor!r}")
        if not math.isfinite(self.factor):
            raise ValueError(f"the factor of {where} must be a finite number, got {self.factor}")
        if abs(self.factor) > MAX_FACTOR:
            raise ValueError(
                f"the factor of {where} is {self.factor:g}; expected a factor between {-MAX_FACTOR:g} "
                f"and {MAX_FACTOR:g} (0 switches the memory off, 2 doubles it)"
            )

    @classmethod
    def parse(cls, text: str, zero: bool = False) -> "Intervention":
        """`L:i` (with `zero`) or `L:i=factor`, e.g. `12:345` or `12:345=3`."""
        pattern = r"(-?\d+):(\d+)" if zero else r"(-?\d+):(\d+)=(-?[0-9.]+(?:e-?\d+)?)"
        match = re.fullmatch(pattern, text.strip())
        if not match:
            raise ValueError(
                f"expected {'LAYER:MEMORY like 12:345' if zero else 'LAYER:MEMORY=FACTOR like 12:345=3'}, got {text!r}"
            )
        return cls(int(match[1]), int(match[2]), 0.0 if zero else float(match[3]))


def intervention_scales(lm: LM, interventions: list[Intervention]) -> dict[tuple[str, int], Scaling]:
    """Trace `scale` argument for `interventions` (checked against the model's layers and d_ff)."""
    by_layer: dict[int, dict[int, float]] = {}
    for iv in interventions:
        layer = lm.check_layer(iv.layer)
        d_ff = ffn_memory(lm, layer).d_ff
        if not 0 <= iv.key < d_ff:
            raise ValueError(f"memory {iv.key} is out of range; layer {layer} has memories 0..{d_ff - 1}")
        by_layer.setdefault(layer, {})[iv.key] = iv.factor
    return {
        ("coefficients", l): Scaling(torch.tensor(list(d)), torch.tensor(list(d.values()), dtype=torch.float32))
        for l, d in by_layer.items()
    }


def check_distribution(probs: torch.Tensor, interventions: list[Intervention]) -> torch.Tensor:
    """`probs` if every probability is finite; else ValueError: the interventions broke the forward pass (so
    nothing about the result, such as "the top token changed", may be reported)."""
    if not bool(torch.isfinite(probs).all()):
        what = ", ".join(f"{iv.layer}:{iv.key}×{iv.factor:g}" for iv in interventions)
        raise ValueError(
            f"the intervention {what} made the model's output NaN/Inf (the scaled activations overflow "
            "this model's number format); use a smaller factor"
        )
    return probs


def _encode(lm: LM, prompt: str) -> dict[str, torch.Tensor]:
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return lm.tokenizer(prompt, return_tensors="pt").to(lm.device)


@torch.no_grad()
def inspect_prompt(
    lm: LM,
    prompt: str,
    top_memories: int = 10,
    top_tokens: int = 5,
    triggers: TriggerSet | None = None,
    trigger_examples: int = 3,
    apply_final_norm: bool = False,
    interventions: list[Intervention] | None = None,
) -> dict[str, Any]:
    """Everything `kvedit inspect` shows for one prompt, as JSON-ready data.

    Per layer at the last token: the `top_memories` memories with the largest `|m_i|·‖v_i‖` (coefficient,
    contribution, the value's top tokens read with the sign of `m_i`, trigger examples when `triggers` holds
    that layer) and the logit lens (top tokens and probabilities). With `interventions`, the next-token
    distribution before and after scaling those memories.
    """
    strings = token_strings(lm)
    enc = _encode(lm, prompt)
    layers = list(range(lm.num_layers))
    with Trace(lm, read=[(kind, l) for l in layers for kind in ("coefficients", "residual")]) as tr:
        logits = lm.model(**enc).logits[0, -1].float()
    result: dict[str, Any] = {
        "prompt": prompt,
        "tokens": [strings[t] for t in enc["input_ids"][0].tolist()],
        "final_norm": apply_final_norm,
        "layers": [],
    }
    for layer in layers:
        m = tr["coefficients", layer][0, -1].float()
        values = ffn_memory(lm, layer).written.detach().float()
        contribution = m.abs() * values.norm(dim=1)
        best = contribution.topk(min(top_memories, m.shape[0])).indices.tolist()
        signed = values[best] * torch.sign(m[best])[:, None]
        value_top = project(lm, signed, apply_final_norm).topk(top_tokens, dim=-1).indices.tolist()
        memories = []
        for rank, key in enumerate(best):
            entry = {
                "key": key,
                "coefficient": float(m[key]),
                "contribution": float(contribution[key]),
                "value_tokens": [strings[t] for t in value_top[rank]],
            }
            if triggers is not None and layer in triggers.layers:
                entry["triggers"] = [
                    lm.tokenizer.decode(list(ex.ids), skip_special_tokens=True)
                    for ex in triggers.examples(layer, key, trigger_examples)
                ]
            memories.append(entry)
        lens = torch.softmax(logit_lens(lm, tr["residual", layer][0, -1]), -1)
        lens_top = lens.topk(top_tokens)
        result["layers"].append(
            {
                "layer": layer,
                "memories": memories,
                "lens": [
                    {"token": strings[t], "prob": float(p)}
                    for t, p in zip(lens_top.indices.tolist(), lens_top.values.tolist())
                ],
            }
        )
    probs = torch.softmax(logits, -1)
    result["next_token"] = _top(probs, strings, top_tokens)
    if interventions:
        with Trace(lm, scale=intervention_scales(lm, interventions)):
            after = check_distribution(torch.softmax(lm.model(**enc).logits[0, -1].float(), -1), interventions)
        change = after - probs
        moved = change.abs().topk(top_tokens).indices.tolist()
        result["intervention"] = {
            "interventions": [
                {"layer": lm.check_layer(iv.layer), "key": iv.key, "factor": iv.factor} for iv in interventions
            ],
            "next_token_after": _top(after, strings, top_tokens),
            "kl_before_after": float((probs * (probs.clamp_min(1e-12).log() - after.clamp_min(1e-12).log())).sum()),
            "top_changed": int(probs.argmax()) != int(after.argmax()),
            "largest_changes": [
                {"token": strings[t], "before": float(probs[t]), "after": float(after[t])} for t in moved
            ],
        }
    return result


def _top(probs: torch.Tensor, strings: list[str], k: int) -> list[dict[str, Any]]:
    top = probs.topk(k)
    return [{"token": strings[t], "prob": float(p)} for t, p in zip(top.indices.tolist(), top.values.tolist())]


def inspect_markdown(report: dict[str, Any], memories_shown: int = 5) -> str:
    """The inspect result as a readable Markdown page."""
    from .vocab import show

    lines = [
        f"# {report['prompt']!r}",
        "",
        "Tokens: " + " ".join(show(t) for t in report["tokens"]),
        "",
        "Next token: " + ", ".join(f"{show(e['token'])} {e['prob']:.3f}" for e in report["next_token"]),
        "",
        "## Logit lens (residual after each layer, final norm + unembedding)",
        "",
        "| layer | top tokens (probability) |",
        "|---:|---|",
    ]
    for entry in report["layers"]:
        lines.append(
            f"| {entry['layer']} | " + ", ".join(f"{show(e['token'])} {e['prob']:.3f}" for e in entry["lens"]) + " |"
        )
    norm = "E·norm(±v)" if report["final_norm"] else "E·(±v), no final norm"
    lines += [
        "",
        f"## Memories that contribute most at the last token (|m|·‖v‖; value tokens read as {norm})",
        "",
        "| layer | memory | m | \\|m\\|·‖v‖ | value tokens | trigger examples |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for entry in report["layers"]:
        for mem in entry["memories"][:memories_shown]:
            trig = " / ".join(show(t) for t in mem.get("triggers", [])) or "–"
            lines.append(
                f"| {entry['layer']} | {mem['key']} | {mem['coefficient']:.3f} | {mem['contribution']:.3f} | "
                + ", ".join(show(t) for t in mem["value_tokens"])
                + f" | {trig} |"
            )
    if "intervention" in report:
        iv = report["intervention"]
        what = ", ".join(f"L{i['layer']}:{i['key']}×{i['factor']:g}" for i in iv["interventions"])
        lines += [
            "",
            f"## Intervention: {what}",
            "",
            "After: " + ", ".join(f"{show(e['token'])} {e['prob']:.3f}" for e in iv["next_token_after"]),
            "",
            f"KL(before‖after) = {iv['kl_before_after']:.4g} nats; top token changed: {iv['top_changed']}",
            "",
            "| token | before | after |",
            "|---|---:|---:|",
        ]
        lines += [f"| {show(c['token'])} | {c['before']:.4f} | {c['after']:.4f} |" for c in iv["largest_changes"]]
    return "\n".join(lines) + "\n"
