"""zsRE metrics, as the reference code (memit `eval_utils_zsre`) computes them.

Per case, teacher-forced token accuracy: for each token t_i of `" " + answer`, is the model's
argmax after the prompt and t_<i equal to t_i; the case's value is the mean over the tokens.

- efficacy:      `answers[0]` (target_new) after the question (`src`);
- paraphrase:    the same after the rephrased question, averaged over paraphrases;
- specificity:   `loc_ans` (neighborhood_target) after `loc + "?"` — accuracy against the true
                 answer, so the unedited model's own value is the ceiling, not 100.

Over cases: means × 100; Score is the harmonic mean of the three (kvedit's addition: the
reference reports the three columns only). Each case also keeps `neighborhood_argmax`, the argmax
token ids along `loc_ans`, for EasyEdit's locality (see `easyedit.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import harmonic_mean
from typing import Any

from ..data.requests import EditRequest
from ..models.lm import LM
from .scoring import score_targets

ZSRE_METRICS = ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_accuracy")


def zsre_case_metrics(lm: LM, requests: Sequence[EditRequest], batch_size: int = 32) -> list[dict[str, Any]]:
    """One dict per request with the three token accuracies as fractions (absent groups omitted)."""
    if not requests:
        return []
    prompts: list[str] = []
    targets: list[str] = []
    index: list[tuple[int, str]] = []
    for i, request in enumerate(requests):
        groups = {
            "efficacy": [(request.rewrite_prompt, request.target_new)],
            "paraphrase": [(p, request.target_new) for p in request.paraphrase_prompts],
        }
        if request.neighborhood_prompts:
            if request.neighborhood_target is None:
                raise ValueError(
                    f"request {request.case_id!r} has neighborhood prompts but no neighborhood_target; zsRE "
                    "specificity scores the true answer (loc_ans) of each neighborhood prompt"
                )
            groups["neighborhood"] = [(p, request.neighborhood_target) for p in request.neighborhood_prompts]
        for group, pairs in groups.items():
            for prompt, target in pairs:
                prompts.append(prompt)
                targets.append(target)
                index.append((i, group))
    scores = score_targets(lm, prompts, targets, batch_size)
    accuracy, predicted = scores.token_accuracy.tolist(), scores.predicted_ids()
    per_group: list[dict[str, list[float]]] = [{} for _ in requests]
    cases: list[dict[str, Any]] = [{"case_id": r.case_id} for r in requests]
    for (i, group), value, ids in zip(index, accuracy, predicted):
        per_group[i].setdefault(group, []).append(value)
        if group == "neighborhood":
            cases[i].setdefault("neighborhood_argmax", []).append(ids)
    return [
        case | {f"{g}_accuracy": sum(v) / len(v) for g, v in groups.items()} for case, groups in zip(cases, per_group)
    ]


def summarize_zsre(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases × 100 and their harmonic mean as Score; a metric no case has is None."""
    summary: dict[str, Any] = {"n": len(cases)}
    for metric in ZSRE_METRICS:
        values = [c[metric] for c in cases if metric in c]
        summary[metric] = 100.0 * sum(values) / len(values) if values else None
    rates = [summary[m] for m in ZSRE_METRICS]
    summary["score"] = None if any(r is None for r in rates) else harmonic_mean(rates)
    return summary
