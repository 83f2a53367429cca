"""CounterFact probability metrics, as the reference code (memit `eval_utils_counterfact`) computes them.

Per case, with NLL = mean per-token NLL of `" " + target` after the prompt:

- efficacy success:      NLL_new < NLL_true on the rewrite prompt;
- paraphrase success:    the same, averaged over the case's paraphrase prompts;
- neighborhood success:  NLL_true < NLL_new, averaged over the neighborhood prompts;
- magnitudes:            e^(−NLL_new) − e^(−NLL_true) (reversed for neighborhood).

Over cases: means × 100; Score = harmonic mean of the three success rates.

The same forward passes also give what EasyEdit's definitions need (see `easyedit.py`): the
token accuracy of target_new on the efficacy and paraphrase prompts, and the argmax tokens along
the true target of every neighborhood prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import harmonic_mean
from typing import Any

from ..data.requests import EditRequest
from ..models.lm import LM
from .scoring import score_targets

GROUPS = ("efficacy", "paraphrase", "neighborhood")


def _group_prompts(request: EditRequest) -> dict[str, tuple[str, ...]]:
    return {
        "efficacy": (request.rewrite_prompt,),
        "paraphrase": request.paraphrase_prompts,
        "neighborhood": request.neighborhood_prompts,
    }


def counterfact_case_metrics(lm: LM, requests: Sequence[EditRequest], batch_size: int = 32) -> list[dict[str, Any]]:
    """Score every request's prompt groups against target_new and target_true in batched passes.

    Returns one dict per request: for each group present, `<group>_success` and
    `<group>_magnitude` (fractions and probability differences, not yet × 100) and the raw
    `<group>_p_new` / `<group>_p_true` lists (e^(−NLL) per prompt); `efficacy_token_accuracy` and
    `paraphrase_token_accuracy` (target_new, mean over prompts); `neighborhood_argmax` (per
    neighborhood prompt, the argmax token ids teacher-forced along its true target).
    """
    prompts: list[str] = []
    targets: list[str] = []
    index: list[tuple[int, str]] = []  # (request, group) per prompt, for both targets in turn
    for i, request in enumerate(requests):
        if request.target_true is None:
            raise ValueError(
                f"request {request.case_id!r} has no target_true; CounterFact metrics compare target_new "
                "with target_true"
            )
        for group, group_prompts in _group_prompts(request).items():
            true = request.target_true
            if group == "neighborhood" and request.neighborhood_target is not None:
                true = request.neighborhood_target
            for prompt in group_prompts:
                for target in (request.target_new, true):
                    prompts.append(prompt)
                    targets.append(target)
                    index.append((i, group))
    scores = score_targets(lm, prompts, targets, batch_size=batch_size)
    nll, accuracy, predicted = scores.nll.tolist(), scores.token_accuracy.tolist(), scores.predicted_ids()

    cases: list[dict[str, Any]] = [{"case_id": r.case_id} for r in requests]
    token_accuracy: list[dict[str, list[float]]] = [{} for _ in requests]
    for k in range(0, len(nll), 2):  # rows k (target_new) and k + 1 (true target) share a prompt
        i, group = index[k]
        p_new, p_true = math.exp(-nll[k]), math.exp(-nll[k + 1])
        cases[i].setdefault(f"{group}_p_new", []).append(p_new)
        cases[i].setdefault(f"{group}_p_true", []).append(p_true)
        if group == "neighborhood":
            cases[i].setdefault("neighborhood_argmax", []).append(predicted[k + 1])
        else:
            token_accuracy[i].setdefault(group, []).append(accuracy[k])
    for case, groups in zip(cases, token_accuracy):
        case |= {f"{g}_token_accuracy": sum(v) / len(v) for g, v in groups.items()}
    for case in cases:
        for group in GROUPS:
            if f"{group}_p_new" not in case:
                continue
            p_new, p_true = case[f"{group}_p_new"], case[f"{group}_p_true"]
            sign = -1.0 if group == "neighborhood" else 1.0
            # success compares NLLs; e^(−NLL) is monotone, so comparing probabilities is identical
            hits = [(sign * (a - b)) > 0 for a, b in zip(p_new, p_true)]
            case[f"{group}_success"] = sum(hits) / len(hits)
            case[f"{group}_magnitude"] = sum(sign * (a - b) for a, b in zip(p_new, p_true)) / len(hits)
    return cases


def summarize_counterfact(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases × 100, and Score (harmonic mean of the three success rates).

    A group no case has is reported as None, and so is Score then; never as 0.
    """
    summary: dict[str, Any] = {"n": len(cases)}
    for group in GROUPS:
        for stat in ("success", "magnitude"):
            values = [c[f"{group}_{stat}"] for c in cases if f"{group}_{stat}" in c]
            summary[f"{group}_{stat}"] = 100.0 * sum(values) / len(values) if values else None
    rates = [summary[f"{g}_success"] for g in GROUPS]
    summary["score"] = None if any(r is None for r in rates) else harmonic_mean(rates)
    return summary
