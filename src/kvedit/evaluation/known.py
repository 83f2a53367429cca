"""The known-fact filter: does the unedited model already prefer the true object to the new one?

- `known_filter`: per request, True or False.
- `first_known`: the first n known requests of a file, reading no further than needed."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

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


def first_known(
    lm: LM, requests: Sequence[EditRequest], n: int | None = None, chunk: int = 64, progress: bool = True
) -> tuple[list[EditRequest], int]:
    """The first `n` requests (all if None) that `known_filter` keeps, in file order, and how many were read to
    find them: the file is scored `chunk` requests at a time, with a progress bar, and only as far as needed."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    kept: list[EditRequest] = []
    read = 0
    with tqdm(total=len(requests), unit="case", desc="known-fact filter", disable=not progress, leave=False) as bar:
        while read < len(requests) and (n is None or len(kept) < n):
            part = requests[read : read + chunk]
            kept += [r for r, known in zip(part, known_filter(lm, part)) if known]
            read += len(part)
            bar.update(len(part))
            bar.set_postfix(known=len(kept))
    return kept[:n], read
