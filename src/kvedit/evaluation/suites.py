"""The dataset families kvedit scores (`SUITES`): each row says how its cases are read, filtered ("known"),
scored and tabulated, so adding a set is adding a row; `dataset_title` names a bench's data in titles."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..data.download import OFFICIAL_DATASETS


@dataclass(frozen=True)
class Metric:
    """A per-case metric: its column title, record key and the factor to its reported unit."""

    title: str
    key: str
    scale: float = 100.0


@dataclass(frozen=True)
class Suite:
    """The metrics of a dataset family and how its cases are read, filtered and scored, so that no code asks
    which dataset it has (as memit pairs each dataset with its evaluator).

    score_of: the success rates whose harmonic mean is Score (none: no Score), the table's first columns;
    columns: further table columns after Score (e.g. portability); compared: the metrics of the paired-comparison
    tables (report.md, `kvedit compare`), default `score_of`; easyedit: the keys of EasyEdit's rewrite accuracy,
    rephrase accuracy and locality (None: no such table); title: how titles name the suite;
    scorer / known: "module:function" in kvedit.evaluation (imported on use) scoring a list of cases, and giving
    per case whether the unedited model knows the fact the edit replaces (`known_rule` says how, for titles);
    reads: the propagation format its cases are read as (`data.propagation`), None for edit requests
    (`load_requests`); generation: cases with generation prompts also get fluency and consistency;
    locality: (argmax key, unchanged key) pairs: a case's argmax ids compared with the unedited run's give
    EasyEdit's locality; needs_target_true / needs_neighborhood_target: what every request must have
    (`bench.config.choose_suite` names a case without it); sequential: whether `--sequential` can run it."""

    name: str
    metrics: tuple[Metric, ...]
    score_of: tuple[str, ...]
    easyedit: tuple[str, str, str] | None = None
    title: str = ""
    scorer: str = ""
    generation: bool = False
    columns: tuple[str, ...] = ()
    compared: tuple[str, ...] = ()
    reads: str | None = None
    known: str = "known:known_filter"
    known_rule: str = "P(target_true) > P(target_new) on the rewrite prompt"
    locality: tuple[tuple[str, str], ...] = (("neighborhood_argmax", "neighborhood_unchanged"),)
    needs_target_true: bool = False
    needs_neighborhood_target: bool = False
    sequential: bool = True

    def case_metrics(self, lm: Any, cases: Sequence[Any]) -> list[dict[str, Any]]:
        """The suite's per-case metrics of `cases` on `lm` as it is now (without generation metrics)."""
        return _function(self.scorer)(lm, cases)

    def known_flags(self, lm: Any, cases: Sequence[Any]) -> list[bool]:
        """Per case: does the unedited `lm` know the fact the edit replaces (`known_rule`)?"""
        return [bool(x) for x in _function(self.known)(lm, cases)]

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics paired comparisons and plots show: `compared`, else `score_of`."""
        return self.compared or self.score_of

    def table_keys(self) -> list[str]:
        """The table's metric columns: `score_of`, Score (when there is one), `columns`."""
        return [*self.score_of, *(["score"] if self.score_of else []), *self.columns]

    def metric_titles(self) -> dict[str, str]:
        """Record key -> column title, e.g. ``neighborhood_success`` -> ``Specificity`` (and ``score`` -> Score)."""
        return {m.key: m.title for m in self.metrics} | {"score": "Score"}


def _function(spec: str) -> Any:
    """The function a "module:function" names in kvedit.evaluation."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"kvedit.evaluation.{module}"), name)


EASYEDIT_TITLES = ("Rewrite acc", "Rephrase acc", "Locality")
_COUNTERFACT = (
    Metric("Efficacy", "efficacy_success"),
    Metric("Paraphrase", "paraphrase_success"),
    Metric("Specificity", "neighborhood_success"),
    Metric("Efficacy magnitude", "efficacy_magnitude"),
    Metric("Paraphrase magnitude", "paraphrase_magnitude"),
    Metric("Specificity magnitude", "neighborhood_magnitude"),
    Metric("Fluency", "fluency"),
    Metric("Consistency", "consistency"),
    Metric("Rewrite acc (EasyEdit)", "efficacy_token_accuracy"),
    Metric("Rephrase acc (EasyEdit)", "paraphrase_token_accuracy"),
    Metric("Locality (EasyEdit)", "neighborhood_unchanged"),
)
_ZSRE = (
    Metric("Efficacy", "efficacy_accuracy"),
    Metric("Paraphrase", "paraphrase_accuracy"),
    Metric("Specificity", "neighborhood_accuracy"),
    Metric("Locality (EasyEdit)", "neighborhood_unchanged"),
)
_CF_SCORE = ("efficacy_success", "paraphrase_success", "neighborhood_success")
_ZSRE_SCORE = ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_accuracy")
_PORTABILITY = Metric("Portability", "portability_accuracy")
#: the portability sets' known rule (`portability.known_by_preference`); False without target_true
_PREFERENCE = "P(target_true) > P(target_new) on the rewrite prompt (no target_true: not known)"

SUITES: Mapping[str, Suite] = MappingProxyType(
    {
        "counterfact": Suite(
            "counterfact",
            _COUNTERFACT,
            _CF_SCORE,
            ("efficacy_token_accuracy", "paraphrase_token_accuracy", "neighborhood_unchanged"),
            "CounterFact",
            scorer="counterfact:counterfact_case_metrics",
            generation=True,
            needs_target_true=True,
        ),
        "zsre": Suite(
            # on zsRE EasyEdit's rewrite and rephrase accuracies are the reference efficacy and paraphrase
            "zsre",
            _ZSRE,
            _ZSRE_SCORE,
            ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_unchanged"),
            "zsRE",
            scorer="zsre:zsre_case_metrics",
            needs_neighborhood_target=True,
        ),
        "counterfact-portability": Suite(
            "counterfact-portability",
            (*_COUNTERFACT, _PORTABILITY),
            _CF_SCORE,
            ("efficacy_token_accuracy", "paraphrase_token_accuracy", "neighborhood_unchanged"),
            "CounterFact portability",
            scorer="propagation:counterfact_portability_case_metrics",
            generation=True,
            columns=("portability_accuracy",),
            compared=(*_CF_SCORE, "portability_accuracy"),
            reads="counterfact-portability",
            known="portability:known_by_preference",
            known_rule=_PREFERENCE,
            needs_target_true=True,
            sequential=False,
        ),
        "zsre-portability": Suite(
            "zsre-portability",
            (*_ZSRE, _PORTABILITY),
            _ZSRE_SCORE,
            ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_unchanged"),
            "zsRE portability",
            scorer="propagation:zsre_portability_case_metrics",
            columns=("portability_accuracy",),
            compared=(*_ZSRE_SCORE, "portability_accuracy"),
            reads="zsre-portability",
            known="portability:known_by_preference",
            known_rule=_PREFERENCE,
            needs_neighborhood_target=True,
            sequential=False,
        ),
        "knowedit": Suite(
            "knowedit",
            (
                Metric("Efficacy", "efficacy_accuracy"),
                Metric("Paraphrase", "paraphrase_accuracy"),
                Metric("Locality", "relation_specificity_unchanged"),
                _PORTABILITY,
                Metric("Reasoning", "reasoning_accuracy"),
                Metric("Subject aliasing", "subject_aliasing_accuracy"),
                Metric("Logical generalisation", "logical_generalization_accuracy"),
                Metric("Relation specificity acc", "relation_specificity_accuracy"),
            ),
            # KnowEdit's own columns: edit success, portability, locality (unchanged predictions: the true answers of
            # the relation-specificity prompts are rarely the argmax of a small model, so their accuracy is near 0)
            ("efficacy_accuracy", "paraphrase_accuracy", "relation_specificity_unchanged"),
            ("efficacy_accuracy", "paraphrase_accuracy", "relation_specificity_unchanged"),
            "KnowEdit",
            scorer="propagation:zsre_portability_case_metrics",
            columns=(
                "portability_accuracy",
                "reasoning_accuracy",
                "subject_aliasing_accuracy",
                "logical_generalization_accuracy",
                "relation_specificity_accuracy",
            ),
            compared=(
                "efficacy_accuracy",
                "paraphrase_accuracy",
                "relation_specificity_unchanged",
                "portability_accuracy",
            ),
            reads="knowedit",
            known="portability:known_by_preference",
            known_rule=_PREFERENCE,
            locality=(("relation_specificity_argmax", "relation_specificity_unchanged"),),
            sequential=False,
        ),
        "mquake": Suite(
            "mquake",
            (
                Metric("Edit-wise", "efficacy_success"),
                Metric("Single-hop", "single_hop_accuracy"),
                Metric("Multi-hop", "multihop_accuracy"),
                Metric("Multi-hop (old answer)", "multihop_old_accuracy"),
                Metric("Single-hop prob.", "single_hop_prob_accuracy"),
                Metric("Multi-hop prob.", "multihop_prob_accuracy"),
                Metric("Multi-hop prob. (any)", "multihop_prob_any"),
                Metric("NLL margin (nats)", "multihop_nll_margin", scale=1.0),
            ),
            (),
            None,
            "MQuAKE",
            scorer="propagation:mquake_case_metrics",
            columns=(
                "efficacy_success",
                "single_hop_accuracy",
                "multihop_accuracy",
                "multihop_old_accuracy",
                "single_hop_prob_accuracy",
                "multihop_prob_accuracy",
                "multihop_nll_margin",
            ),
            compared=("efficacy_success", "single_hop_accuracy", "multihop_accuracy", "multihop_prob_accuracy"),
            reads="mquake",
            known="multihop:known_multihop",
            known_rule="the unedited model prefers the old answer to the new one (lower NLL) on one of the questions",
            locality=(),
            needs_target_true=True,
            sequential=False,
        ),
    }
)


def dataset_title(dataset: str | None, suite: str) -> str:
    """How titles name a bench's data: a built-in name as it is ("counterfact", "zsre"), a file by its name
    and the suite that scored it ("my_facts.json, CounterFact metrics"); without a dataset (an old summary),
    the suite's name."""
    if not dataset:
        return suite
    name = Path(str(dataset)).name
    if name == str(dataset) and name in OFFICIAL_DATASETS:
        return name
    titled = SUITES[suite].title if suite in SUITES else suite
    return f"{name}, {titled} metrics"
