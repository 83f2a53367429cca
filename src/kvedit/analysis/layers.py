"""Per-layer statistics of the key-value view (Geva et al. 2021 §4–5), one streaming pass over a corpus.

- agreement: fraction of memories whose value's top token (of `+v`, or `-v` when the top trigger example's
  coefficient is negative) equals the token that follows the key's top trigger example; the baseline
  pairs each value with a randomly chosen other key (mean over shuffles). `agreement_any` counts a match
  with the next token of any of the key's top-k examples.
- shallow: fraction of a key's top-k trigger examples whose trigger token is the key's most common one
  (high = the key fires on one word, a shallow pattern).
- active: memories active per token: `m > 0` for ReLU FFNs; otherwise `|m_i|·‖v_i‖ ≥ threshold ×` the
  token's largest `|m_j|·‖v_j‖` (the threshold is recorded).
- composition: fraction of tokens whose FFN output's top token (`E·o`, with `o` what the FFN adds to the
  residual: after the post-FFN norm where the family has one) is the top token of none of the active memories
  (each read as `E·(sign(m_i)·v_i)`), over tokens with at least one active memory.
- refinement (logit lens): how often the residual's top token after the layer equals the model's final
  prediction, the mean probability the lens gives that prediction, and how often adding the FFN's output
  changed the residual's top token (not defined for post-LN models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.lm import LM
from ..models.memory import ffn_memory
from ..models.tracing import Trace
from .corpus import token_batches
from .triggers import TriggerSet
from .values import ValueProjection
from .vocab import logit_lens, project


def is_relu(lm: LM) -> bool:
    """Whether a memory is off exactly when its coefficient is 0 (ReLU FFN)."""
    return lm.arch.activation(lm.model.config) == "relu" and not lm.arch.gated


def agreement(
    triggers: TriggerSet, projections: dict[int, ValueProjection], shuffles: int = 10, seed: int = 0
) -> dict[int, dict[str, float]]:
    """Agreement between values' top tokens and keys' trigger examples, with shuffled-key baselines, and the
    shallow-pattern rate, for every layer both cover."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[int, dict[str, float]] = {}
    for layer in sorted(set(triggers.layers) & set(projections)):
        nxt = triggers.token_table(layer, 1)  # [d_ff, k]
        trig = triggers.token_table(layer, 0)
        proj = projections[layer]
        positive = triggers.coefficients[layer][:, 0] >= 0
        pred = torch.where(positive, proj.top_ids[:, 0], proj.bottom_ids[:, 0])  # [d_ff]
        valid = nxt[:, 0] >= 0
        top1 = _rate(pred == nxt[:, 0], valid)
        any_k = _rate((pred[:, None] == nxt).any(1), (nxt >= 0).any(1))
        base1, base_any = [], []
        for _ in range(shuffles):
            perm = torch.randperm(pred.shape[0], generator=generator)
            base1.append(_rate(pred[perm] == nxt[:, 0], valid))
            base_any.append(_rate((pred[perm][:, None] == nxt).any(1), (nxt >= 0).any(1)))
        out[layer] = {
            "agreement": top1,
            "agreement_shuffled": sum(base1) / max(1, shuffles),
            "agreement_any": any_k,
            "agreement_any_shuffled": sum(base_any) / max(1, shuffles),
            "shallow": _shallow_rate(trig),
        }
    return out


def _rate(hit: torch.Tensor, valid: torch.Tensor) -> float:
    n = int(valid.sum())
    return float((hit & valid).sum()) / n if n else float("nan")


def _shallow_rate(trigger_tokens: torch.Tensor) -> float:
    """Mean over keys of the share of its examples whose trigger token is its most common trigger token."""
    shares = []
    for row in trigger_tokens:
        row = row[row >= 0]
        if row.numel():
            shares.append(float(torch.bincount(row).max()) / row.numel())
    return sum(shares) / len(shares) if shares else float("nan")


@torch.no_grad()
def corpus_statistics(
    lm: LM,
    source: str,
    projections: dict[int, ValueProjection],
    max_tokens: int = 2000,
    max_length: int = 64,
    batch_size: int = 8,
    active_threshold: float = 0.1,
    progress: bool = True,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Active memories, composition and logit-lens refinement of every layer in `projections`, over
    `max_tokens` counted tokens of `source`. Composition reads the FFN output with the same final-norm
    choice as the projections."""
    if not 0 < active_threshold <= 1:
        raise ValueError(f"active_threshold must be in (0, 1], got {active_threshold}")
    layers = sorted(projections)
    relu = is_relu(lm)
    norms = {l: ffn_memory(lm, l).written.detach().float().norm(dim=1) for l in layers}  # ‖v_i‖ as written, [d_ff]
    use_norm = any(p.final_norm for p in projections.values())
    acc = {
        l: dict.fromkeys(("tokens", "active", "composed", "with_active", "match", "prob", "changed"), 0.0)
        for l in layers
    }
    bar = tqdm(total=max_tokens, unit="tok", desc="layer statistics", disable=not progress)
    for batch, _ in token_batches(lm, source, max_tokens, max_length, batch_size, seed=seed):
        reads = [(kind, l) for l in layers for kind in ("residual", "ffn_write", "coefficients")]
        with Trace(lm, read=reads) as tr:
            logits = lm.model(
                input_ids=batch.input_ids.to(lm.device), attention_mask=batch.attention_mask.to(lm.device)
            ).logits
        sel = batch.counted.to(lm.device)
        final = logits[sel].argmax(-1)  # the model's own prediction at each counted token, [N]
        for layer in layers:
            a = acc[layer]
            resid, ffn, m = (
                tr["residual", layer][sel],
                tr["ffn_write", layer][sel],
                tr["coefficients", layer][sel].float(),
            )
            lens = logit_lens(lm, resid)
            top = lens.argmax(-1)
            a["match"] += float((top == final).sum())
            a["prob"] += float(torch.softmax(lens, -1).gather(1, final[:, None]).sum())
            if not lm.arch.post_norm:
                a["changed"] += float((logit_lens(lm, resid - ffn).argmax(-1) != top).sum())
            contribution = m.abs() * norms[layer].to(m.device)
            active = m > 0 if relu else contribution >= active_threshold * contribution.amax(1, keepdim=True)
            proj = projections[layer]
            pred = torch.where(m >= 0, proj.top_ids[:, 0].to(m.device), proj.bottom_ids[:, 0].to(m.device))
            ffn_top = project(lm, ffn, use_norm).argmax(-1)
            hit = ((pred == ffn_top[:, None]) & active).any(1)
            has = active.any(1)
            a["active"] += float(active.sum())
            a["composed"] += float((~hit & has).sum())
            a["with_active"] += float(has.sum())
            a["tokens"] += int(sel.sum())
        bar.update(batch.num_tokens)
    bar.close()
    out: dict[int, dict[str, float]] = {}
    for layer, a in acc.items():
        n = max(a["tokens"], 1)
        d_ff = norms[layer].shape[0]
        out[layer] = {
            "tokens": int(a["tokens"]),
            "active_mean": a["active"] / n,
            "active_fraction": a["active"] / n / d_ff,
            "composition": a["composed"] / max(a["with_active"], 1),
            "lens_top_is_final": a["match"] / n,
            "lens_prob_final": a["prob"] / n,
            "ffn_changed_top": float("nan") if lm.arch.post_norm else a["changed"] / n,
        }
    return out


def active_rule(lm: LM, active_threshold: float) -> str:
    """The 'active memory' rule in words, for outputs."""
    if is_relu(lm):
        return "m_i > 0 (ReLU)"
    return f"|m_i|·‖v_i‖ ≥ {active_threshold:g} × the token's largest |m_j|·‖v_j‖ ({lm.arch.activation(lm.model.config)} FFN)"


def layer_table(stats: dict[int, dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table, one row per layer."""
    lines = ["| layer | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for layer in sorted(stats):
        cells = []
        for c in columns:
            v = stats[layer].get(c)
            cells.append("–" if v is None or v != v else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
