"""What an edit patch changed, read as key-value memories.

A keys edit changes rows of the key matrices (one row per memory); a values edit changes value vectors
(columns of a `[out, in]` values weight, rows of GPT-2's transposed `Conv1D`). For each edited layer this
finds the memories whose weights changed, how their coefficients moved at the last token of the edit
prompts and of neighbourhood prompts and at the subject's last token in the edit prompts (keys edits), and how the changed values' vocabulary projections moved (values
edits, which is also what ROME, MEMIT and PMET patches are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..editing.delta import WeightDelta
from ..models.lm import LM
from ..models.memory import ffn_memory
from ..models.tracing import Trace
from .vocab import project, token_strings


def parameter_roles(lm: LM, names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """(layer, role) of each FFN weight among `names`: role "key:<role>" or "values"; others are left out."""
    roles: dict[str, tuple[int, str]] = {}
    for layer in range(lm.num_layers):
        for role, path in lm.key_paths(layer).items():
            roles[f"{path}.weight"] = (layer, f"key:{role}")
        roles[f"{lm.values_path(layer)}.weight"] = (layer, "values")
    return {n: roles[n] for n in names if n in roles}


def memory_major(lm: LM, weight: torch.Tensor, role: str) -> torch.Tensor:
    """A stored FFN weight as `[d_ff, d_model]`, row i = memory i's key (or value)."""
    out_in = weight.T if lm.arch.transposed else weight
    return out_in if role.startswith("key:") else out_in.T


def changed_memories(lm: LM, delta: WeightDelta) -> dict[int, dict[str, list[int]]]:
    """{layer: {role: sorted memory indices whose weights differ between before and after}}."""
    out: dict[int, dict[str, list[int]]] = {}
    for name, (layer, role) in parameter_roles(lm, delta.names).items():
        before, after = memory_major(lm, delta.before[name], role), memory_major(lm, delta.after[name], role)
        rows = (before != after).any(dim=1).nonzero().flatten().tolist()
        out.setdefault(layer, {})[role] = rows
    return out


def _last_token_coefficients(
    lm: LM, prompts: Sequence[str], layers: Sequence[int], ends: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """{layer: `[P, d_ff]`} coefficients at each prompt's last token, or at the token that ends character
    `ends[i]` of prompt i (e.g. the subject's last token)."""
    enc = lm.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right").to(lm.device)
    last = enc["attention_mask"].sum(1) - 1
    if ends is not None:
        cut = [len(lm.tokenizer(p[:e])["input_ids"]) - 1 for p, e in zip(prompts, ends)]
        last = torch.tensor(cut, device=lm.device).clamp(min=0).minimum(last)
    with torch.no_grad(), Trace(lm, read=[("coefficients", l) for l in layers], positions=last) as tr:
        lm.model(**enc)
    return {l: tr["coefficients", l].float().cpu() for l in layers}


def _movement(before: torch.Tensor, after: torch.Tensor, changed: set[int], top: int) -> dict[str, Any]:
    """Which memories' coefficients moved most (mean |Δm| over prompts), and how much of the movement falls
    on the memories whose weights changed."""
    move = (after - before).abs().mean(0)  # [d_ff]
    best = move.topk(min(top, move.shape[0])).indices.tolist()
    total = float(move.sum())
    on_changed = float(move[sorted(changed)].sum()) if changed else 0.0
    return {
        "mean_abs_change": float(move.mean()),
        "top": [
            {
                "key": k,
                "mean_abs_change": float(move[k]),
                "before": float(before[:, k].mean()),
                "after": float(after[:, k].mean()),
                "weights_changed": k in changed,
            }
            for k in best
        ],
        "share_on_changed_memories": on_changed / total if total > 0 else float("nan"),
    }


@torch.no_grad()
def patch_report(
    lm: LM,
    delta: WeightDelta,
    prompts: Sequence[str] = (),
    neighborhood: Sequence[str] = (),
    top: int = 10,
    top_tokens: int = 5,
    apply_final_norm: bool = False,
) -> dict[str, Any]:
    """What `delta` changed, for a model holding the *unedited* weights (the patch is applied and reverted
    here). `prompts` default to the patch's rewrite prompts, `neighborhood` to its neighbourhood prompts."""
    requests = delta.metadata.get("requests") or []
    prompts = list(prompts) or [r["prompt"].replace("{}", r["subject"]) for r in requests if "prompt" in r]
    neighborhood = list(neighborhood) or [p for r in requests for p in r.get("neighborhood_prompts", ())]
    changed = changed_memories(lm, delta)
    if not changed:
        raise ValueError(
            "the patch changes no FFN key or value weights of this model; nothing to read as memories "
            f"(it changes {delta.names})"
        )
    layers = sorted(changed)
    other = [n for n in delta.names if n not in parameter_roles(lm, delta.names)]
    report: dict[str, Any] = {
        "method": delta.metadata.get("method"),
        "prompts": prompts,
        "neighborhood": neighborhood,
        "other_parameters": other,
        "layers": {},
    }
    sets: dict[str, tuple[list[str], list[int] | None]] = {
        "prompts": (prompts, None),
        "neighborhood": (neighborhood, None),
    }
    subjects = [r["subject"] for r in requests if r.get("subject")]
    ends = [next((p.find(s) + len(s) for s in subjects if s in p), None) for p in prompts]
    if any(e is not None for e in ends):  # the subject's last token in the edit prompts
        sets["subject"] = ([p for p, e in zip(prompts, ends) if e is not None], [e for e in ends if e is not None])
    before = {name: _last_token_coefficients(lm, ps, layers, e) for name, (ps, e) in sets.items() if ps}
    delta.apply(lm)
    try:
        after = {name: _last_token_coefficients(lm, ps, layers, e) for name, (ps, e) in sets.items() if ps}
    finally:
        delta.revert(lm)
    strings = token_strings(lm)
    for layer in layers:
        roles = changed[layer]
        entry: dict[str, Any] = {
            "changed": {role: {"count": len(rows), "memories": rows[:200]} for role, rows in roles.items()}
        }
        key_rows = sorted({r for role, rows in roles.items() if role.startswith("key:") for r in rows})
        if key_rows or "values" not in roles:
            entry["coefficients"] = {
                name: _movement(before[name][layer], after[name][layer], set(key_rows), top) for name in before
            }
            if "prompts" in entry["coefficients"] and "neighborhood" in entry["coefficients"]:
                p, n = entry["coefficients"]["prompts"], entry["coefficients"]["neighborhood"]
                entry["locality_ratio"] = n["mean_abs_change"] / p["mean_abs_change"] if p["mean_abs_change"] else None
                tp, tn = {t["key"] for t in p["top"]}, {t["key"] for t in n["top"]}
                entry["top_overlap"] = len(tp & tn) / len(tp | tn) if tp | tn else None
        if "values" in roles:
            entry["values"] = _value_changes(
                lm,
                delta,
                layer,
                roles["values"],
                before.get("prompts", {}).get(layer),
                strings,
                top,
                top_tokens,
                apply_final_norm,
            )
        report["layers"][layer] = entry
    return report


def _value_changes(lm, delta, layer, rows, prompt_coefficients, strings, top, top_tokens, apply_final_norm):
    name = f"{lm.values_path(layer)}.weight"
    v_before = memory_major(lm, delta.before[name], "values").float()
    v_after = memory_major(lm, delta.after[name], "values").float()
    change = (v_after - v_before).norm(dim=1)  # ‖Δv_i‖, [d_ff]
    best = change.topk(min(top, len(rows) or 1)).indices.tolist() if rows else []
    dev = ffn_memory(lm, layer).values.device

    def tokens(vectors: torch.Tensor) -> list[list[str]]:
        ids = project(lm, vectors.to(dev), apply_final_norm).topk(top_tokens, dim=-1).indices.tolist()
        return [[strings[t] for t in row] for row in ids]

    out: dict[str, Any] = {"relative_change": float(change.norm() / v_before.norm()), "top": []}
    if best:
        tb, ta, td = tokens(v_before[best]), tokens(v_after[best]), tokens(v_after[best] - v_before[best])
        out["top"] = [
            {
                "key": k,
                "norm_change": float(change[k]),
                "norm_before": float(v_before[k].norm()),
                "tokens_before": tb[i],
                "tokens_after": ta[i],
                "tokens_of_change": td[i],
            }
            for i, k in enumerate(best)
        ]
    if prompt_coefficients is not None:  # which memories carry the edit on the edit prompts: |m_i|·‖Δv_i‖
        carry = (prompt_coefficients.abs().mean(0) * change).cpu()
        out["carriers_on_prompts"] = [
            {
                "key": k,
                "mean_abs_coefficient": float(prompt_coefficients[:, k].abs().mean()),
                "contribution_change": float(carry[k]),
            }
            for k in carry.topk(min(top, carry.shape[0])).indices.tolist()
        ]
    return out


def patch_markdown(report: dict[str, Any]) -> str:
    """The patch report as a readable Markdown page."""
    from .vocab import show

    lines = [
        f"# What the patch changed ({report.get('method') or 'unknown method'})",
        "",
        f"Edit prompts: {', '.join(repr(p) for p in report['prompts']) or '–'}",
        f"Neighbourhood prompts: {len(report['neighborhood'])}",
        "",
    ]
    if report["other_parameters"]:
        lines += [f"Other parameters changed (not FFN keys/values): {', '.join(report['other_parameters'])}", ""]
    for layer, entry in report["layers"].items():
        lines.append(f"## Layer {layer}")
        lines.append("")
        for role, info in entry["changed"].items():
            lines.append(
                f"- {role}: {info['count']} memories changed"
                + (
                    f" ({', '.join(map(str, info['memories'][:20]))}{', …' if info['count'] > 20 else ''})"
                    if info["count"]
                    else ""
                )
            )
        if "locality_ratio" in entry:
            lines.append(
                f"- mean |Δm| on neighbourhood prompts / on edit prompts: {entry['locality_ratio']:.3f}; "
                f"overlap (Jaccard) of the most-moved memories: {entry['top_overlap']:.2f}"
            )
        for name, move in entry.get("coefficients", {}).items():
            where = (
                "the subject's last token in the edit prompts" if name == "subject" else f"the last token of the {name}"
            )
            lines += [
                "",
                f"Coefficients at {where} (mean |Δm| {move['mean_abs_change']:.4f}; "
                f"{100 * move['share_on_changed_memories']:.1f} % of the movement on memories whose keys changed):",
                "",
                "| memory | mean \\|Δm\\| | m before | m after | key changed |",
                "|---:|---:|---:|---:|---|",
            ]
            lines += [
                f"| {t['key']} | {t['mean_abs_change']:.4f} | {t['before']:.4f} | {t['after']:.4f} | "
                f"{'yes' if t['weights_changed'] else 'no'} |"
                for t in move["top"]
            ]
        if "values" in entry:
            val = entry["values"]
            lines += [
                "",
                f"Values: ‖ΔV‖/‖V‖ = {val['relative_change']:.4g}",
                "",
                "| memory | ‖Δv‖ | ‖v‖ | tokens before | tokens after | tokens of Δv |",
                "|---:|---:|---:|---|---|---|",
            ]
            lines += [
                f"| {t['key']} | {t['norm_change']:.4f} | {t['norm_before']:.3f} | "
                f"{', '.join(map(show, t['tokens_before']))} | {', '.join(map(show, t['tokens_after']))} | "
                f"{', '.join(map(show, t['tokens_of_change']))} |"
                for t in val["top"]
            ]
            if "carriers_on_prompts" in val:
                lines += [
                    "",
                    "Memories carrying the edit on the edit prompts (mean |m| · ‖Δv‖): "
                    + ", ".join(f"{c['key']} ({c['contribution_change']:.3g})" for c in val["carriers_on_prompts"]),
                ]
        lines.append("")
    return "\n".join(lines) + "\n"
