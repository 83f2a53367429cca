"""EasyEdit's metric definitions, reported beside the reference ones and labelled as such.

EasyEdit (Wang et al. 2023) scores an edit by teacher-forced token accuracy, not by comparing
the probabilities of two targets:

- rewrite accuracy:   the fraction of `" " + target_new` tokens that are the argmax after the
                      rewrite prompt and the true earlier target tokens;
- rephrase accuracy:  the same after the paraphrase prompt(s);
- locality:           the fraction of tokens along the true answer of each neighborhood prompt
                      whose argmax is unchanged by the edit (post-edit vs pre-edit predictions),
                      so an edit that leaves unrelated prompts alone scores 100 whatever the
                      unedited model got right.

The first two come straight from the probability pass (`efficacy_token_accuracy`,
`paraphrase_token_accuracy`; on zsRE they equal the reference efficacy and paraphrase). Locality
needs the unedited model's predictions: `add_locality` compares a case's `neighborhood_argmax`
with the unedited run's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

Predictions = Sequence[Sequence[int]]  # per neighborhood prompt, argmax token ids along its target


def locality_unchanged(post: Predictions, pre: Predictions) -> float:
    """Mean over neighborhood prompts of the fraction of positions whose argmax token is the same
    after the edit as before it (a fraction in [0, 1])."""
    if len(post) != len(pre) or not post:
        raise ValueError(
            f"got predictions for {len(post)} prompts after the edit and {len(pre)} before; "
            "expected the same non-zero number"
        )
    fractions = []
    for after, before in zip(post, pre):
        if len(after) != len(before):
            raise ValueError(
                f"a neighborhood target has {len(after)} tokens after the edit and {len(before)} "
                "before; the same prompts must be scored"
            )
        fractions.append(sum(a == b for a, b in zip(after, before)) / len(after))
    return sum(fractions) / len(fractions)


def add_locality(cases: Sequence[MutableMapping[str, Any]], unedited: Mapping[Any, Predictions]) -> None:
    """Set `neighborhood_unchanged` on every case whose unedited predictions are known (in place)."""
    for case in cases:
        before = unedited.get(case["case_id"])
        if before is not None and "neighborhood_argmax" in case:
            case["neighborhood_unchanged"] = locality_unchanged(case["neighborhood_argmax"], before)
