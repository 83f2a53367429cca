"""The known-fact filter: does the unedited model already prefer the true object to the new one?"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.requests import EditRequest
from ..models.lm import LM
from .scoring import target_nll


def known_filter(lm: LM, requests: Sequence[EditRequest], batch_size: int = 32) -> list[bool]:
    """Per request: does the unedited model prefer target_true to target_new on the rewrite prompt
    (P(true) > P(new), i.e. lower mean NLL)?"""
    if any(r.target_true is None for r in requests):
        raise ValueError("--known-only needs target_true for every case (CounterFact); this dataset has none")
    prompts = [r.rewrite_prompt for r in requests]
    new = target_nll(lm, prompts, [r.target_new for r in requests], batch_size)
    true = target_nll(lm, prompts, [r.target_true or "" for r in requests], batch_size)  # none is None: checked
    return (true < new).tolist()
