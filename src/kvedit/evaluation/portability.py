"""Portability and relation-specificity locality as EasyEdit computes them, fluency on CounterFact portability.

All accuracies are EasyEdit's teacher-forced token accuracy (`test_prediction_acc`): the model reads
``prompt + " " + answer``; each token t_i of the answer scores 1 if it is the argmax after the prompt and the
true t_<i; a probe's value is the mean over its tokens (`TokenScores.token_accuracy`).

Per case (fractions in [0, 1]; a key is absent when the case has no probe of that kind, never 0):

- ``portability_accuracy``: mean over all the case's portability probes of the answer's token accuracy after the
  question (the one-hop ``New Answer`` after ``New Question``; KnowEdit's ground truth after its prompt);
- ``{kind}_accuracy`` for kind in one_hop, reasoning, subject_aliasing, logical_generalization: the same over
  the probes of that kind;
- ``relation_specificity_accuracy``: token accuracy of the true answer of each relation-specificity probe
  (KnowEdit's locality prompts), averaged over them — the unedited model's own value is its ceiling;
- ``relation_specificity_argmax``: per probe, the argmax ids along its true answer; with the unedited model's
  (`add_relation_locality`) they give ``relation_specificity_unchanged``, EasyEdit's locality: the fraction of
  positions whose argmax the edit left unchanged, averaged over the probes (100 for an edit that touches
  nothing, whatever the model knew).

Fluency on the CounterFact portability file is `generation.generation_case_metrics` on each case's generation
prompts (consistency too, with the official attribute snippets). `known_by_preference` and
`known_by_accuracy` are the two "known" rules of docs/propagation.md.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ..data.propagation import PORTABILITY_KINDS, PortabilityCase
from ..models.lm import LM
from .easyedit import Predictions, locality_unchanged
from .generation import AttributeSnippets, generation_case_metrics
from .scoring import score_targets, target_nll

LOCALITY_KIND = "relation_specificity"
#: per-case keys `portability_case_metrics` and `add_relation_locality` can set (fractions)
PORTABILITY_METRICS: tuple[str, ...] = (
    "portability_accuracy",
    *(f"{kind}_accuracy" for kind in PORTABILITY_KINDS),
    "relation_specificity_accuracy",
    "relation_specificity_unchanged",
)


def portability_case_metrics(lm: LM, cases: Sequence[PortabilityCase], batch_size: int = 32) -> list[dict[str, Any]]:
    """One dict per case: ``case_id`` and the accuracies of the module docstring (absent kinds omitted), plus
    ``relation_specificity_argmax`` where the case has locality probes. One batched scoring pass."""
    prompts: list[str] = []
    answers: list[str] = []
    index: list[tuple[int, str]] = []
    for i, case in enumerate(cases):
        for probe in (*case.portability, *case.locality):
            prompts.append(probe.prompt)
            answers.append(probe.answer)
            index.append((i, probe.kind))
    out: list[dict[str, Any]] = [{"case_id": case.case_id} for case in cases]
    if not prompts:
        return out
    scores = score_targets(lm, prompts, answers, batch_size)
    per_kind: list[dict[str, list[float]]] = [{} for _ in cases]
    for (i, kind), value, ids in zip(index, scores.token_accuracy.tolist(), scores.predicted_ids()):
        per_kind[i].setdefault(kind, []).append(value)
        if kind == LOCALITY_KIND:
            out[i].setdefault("relation_specificity_argmax", []).append(ids)
    for record, kinds in zip(out, per_kind):
        portable = [v for kind, values in kinds.items() if kind != LOCALITY_KIND for v in values]
        if portable:
            record["portability_accuracy"] = sum(portable) / len(portable)
        for kind, values in kinds.items():
            record[f"{kind}_accuracy"] = sum(values) / len(values)
    return out


def relation_locality(post: Mapping[str, Any], pre: Mapping[str, Any]) -> float:
    """EasyEdit's locality of one case from its edited (`post`) and unedited (`pre`) records: the mean over
    relation-specificity probes of the fraction of answer positions whose argmax is unchanged."""
    return locality_unchanged(post["relation_specificity_argmax"], pre["relation_specificity_argmax"])


def add_relation_locality(cases: Sequence[MutableMapping[str, Any]], unedited: Mapping[Any, Predictions]) -> None:
    """Set ``relation_specificity_unchanged`` (in place) on every case that has ``relation_specificity_argmax``
    and whose unedited argmax ids (by case_id) are in `unedited`."""
    for case in cases:
        before = unedited.get(case["case_id"])
        if before is not None and "relation_specificity_argmax" in case:
            case["relation_specificity_unchanged"] = locality_unchanged(case["relation_specificity_argmax"], before)


def summarize_portability(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``n`` and, per metric of `PORTABILITY_METRICS`, the mean over the cases that have it × 100 (None when no
    case has it) and ``n_<metric>``, the number of cases it is over."""
    summary: dict[str, Any] = {"n": len(cases)}
    for metric in PORTABILITY_METRICS:
        values = [c[metric] for c in cases if metric in c]
        summary[metric] = 100.0 * sum(values) / len(values) if values else None
        summary[f"n_{metric}"] = len(values)
    return summary


def portability_fluency(
    lm: LM, cases: Sequence[PortabilityCase], seed: int = 0, snippets: AttributeSnippets | None = None
) -> list[dict[str, Any]]:
    """Per case: ``fluency`` (the reference's weighted bigram/trigram entropy of top-k samples, see
    `generation.py`) on its generation prompts, ``consistency`` too when `snippets` has its attribute; {} for
    a case without generation prompts (zsRE, KnowEdit)."""
    metrics = generation_case_metrics(lm, [case.request for case in cases], seed=seed, snippets=snippets)
    return [{"case_id": case.case_id} | m if m else {} for case, m in zip(cases, metrics)]


def known_by_preference(lm: LM, cases: Sequence[PortabilityCase], batch_size: int = 32) -> list[bool]:
    """Per case: does the unedited model prefer the true object to the new one on the rewrite prompt (lower mean
    token NLL of target_true than of target_new)? False for a case without target_true (nothing to change)."""
    with_truth = [i for i, c in enumerate(cases) if c.request.target_true is not None]
    flags = [False] * len(cases)
    if not with_truth:
        return flags
    prompts = [cases[i].request.rewrite_prompt for i in with_truth]
    new = target_nll(lm, prompts, [cases[i].request.target_new for i in with_truth], batch_size)
    true = target_nll(lm, prompts, [cases[i].request.target_true or "" for i in with_truth], batch_size)
    for i, ok in zip(with_truth, (true < new).tolist()):
        flags[i] = bool(ok)
    return flags


def known_by_accuracy(
    lm: LM, cases: Sequence[PortabilityCase], threshold: float = 1.0, batch_size: int = 32
) -> list[bool]:
    """Per case: is the unedited model's token accuracy of the true answer after the rewrite prompt at least
    `threshold` (1.0: every token of target_true is the argmax)? False without target_true."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    with_truth = [i for i, c in enumerate(cases) if c.request.target_true is not None]
    flags = [False] * len(cases)
    if not with_truth:
        return flags
    scores = score_targets(
        lm,
        [cases[i].request.rewrite_prompt for i in with_truth],
        [cases[i].request.target_true or "" for i in with_truth],
        batch_size,
    )
    for i, accuracy in zip(with_truth, scores.token_accuracy.tolist()):
        flags[i] = accuracy >= threshold - 1e-9
    return flags
