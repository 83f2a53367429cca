"""The propagation suites' scorers (`suites.SUITES`): the set's edit metrics and its propagation metrics per case.

- CounterFact portability: CounterFact's probability metrics of the case's request (`counterfact_case_metrics`:
  efficacy, paraphrase, specificity, magnitudes, EasyEdit's token accuracies and neighbourhood argmax) and its
  portability (`portability_case_metrics`);
- zsRE portability and KnowEdit: zsRE's token accuracies of the request (`zsre_case_metrics`: efficacy,
  paraphrase, and specificity where it has neighbourhood prompts) and portability per probe kind, with KnowEdit's
  relation-specificity accuracy and argmax ids (its locality);
- MQuAKE: ``efficacy_success``, the mean over the case's edits of CounterFact's efficacy (P(new) > P(true) on
  each edit's cloze prompt: did every edit land?), and the multi-hop metrics (`multihop_case_metrics`).

Each takes the bench's cases (`PortabilityCase`s or `MquakeCase`s) and returns one dict per case (fractions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.propagation import MquakeCase, PortabilityCase
from ..models.lm import LM
from .counterfact import counterfact_case_metrics
from .multihop import multihop_case_metrics
from .portability import portability_case_metrics
from .zsre import zsre_case_metrics


def _merge(*parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case, the union of the parts' dicts (later parts win on a shared key, e.g. case_id)."""
    return [{k: v for part in case for k, v in part.items()} for case in zip(*parts)]


def counterfact_portability_case_metrics(lm: LM, cases: Sequence[PortabilityCase]) -> list[dict[str, Any]]:
    """CounterFact's metrics of each case's request, plus its portability (module docstring)."""
    return _merge(counterfact_case_metrics(lm, [c.request for c in cases]), portability_case_metrics(lm, cases))


def zsre_portability_case_metrics(lm: LM, cases: Sequence[PortabilityCase]) -> list[dict[str, Any]]:
    """zsRE's token accuracies of each case's request, plus its portability and relation specificity."""
    return _merge(zsre_case_metrics(lm, [c.request for c in cases]), portability_case_metrics(lm, cases))


def mquake_case_metrics(lm: LM, cases: Sequence[MquakeCase]) -> list[dict[str, Any]]:
    """Per case: ``efficacy_success`` (mean over its edits of P(target_new) > P(target_true) on the edit's
    prompt) and the metrics of `multihop_case_metrics`. Call it with all of the case's edits applied."""
    edits = counterfact_case_metrics(lm, [r for c in cases for r in c.requests])
    out, start = [], 0
    for case, multihop in zip(cases, multihop_case_metrics(lm, cases)):
        own = edits[start : start + len(case.requests)]
        start += len(case.requests)
        out.append(
            {"case_id": case.case_id, "efficacy_success": sum(e["efficacy_success"] for e in own) / len(own)} | multihop
        )
    return out
