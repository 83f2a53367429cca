"""The explorer's bounds on one request, checked before the request may hold the model.

A request that passes these checks holds the model for a bounded time: texts are short enough to read in one
forward pass of the model's context, lists are short, an edit's step limit and a mining run's token count are
capped. Every check raises `RequestError` (a ValueError: 400 in the API) naming the field and the bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..data.requests import RequestError
from ..models.lm import LM
from . import views


@dataclass(frozen=True)
class Limits:
    """prompt_chars / prompt_tokens: the longest text (the model's context caps tokens too); prompts: the most
    paraphrases, and the most neighbourhood prompts, of one edit; interventions: memories changed at once;
    max_steps: an edit's largest step limit; mine_tokens: the most corpus tokens one mining run reads."""

    prompt_chars: int = 2_000
    prompt_tokens: int = 512
    prompts: int = 20
    interventions: int = 64
    max_steps: int = 1_000
    mine_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be an integer >= 1, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def text(self, lm: LM, text: str, what: str) -> str:
        """`text` checked: valid Unicode, not too many characters, not too many tokens for the model."""
        views.check_prompt(lm, text, what, self.prompt_chars, self.prompt_tokens)
        return text

    def count(self, items: Sequence[object], what: str, limit: int) -> None:
        if len(items) > limit:
            raise RequestError(f"{len(items)} {what} given; at most {limit} are accepted")

    def mine(self, tokens: int) -> int:
        """A mining run's token count: at least 1, at most `mine_tokens`."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= self.mine_tokens:
            raise RequestError(f"tokens must be a whole number from 1 to {self.mine_tokens}, got {tokens!r}")
        return tokens

    def edit_settings(self, lr: float | None, max_steps: int | None, layers: Sequence[int] | None, lm: LM) -> None:
        """An edit's overrides, before any settings are made: a finite positive lr, a step limit within
        bounds, no more layers than the model has."""
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise RequestError(f"lr must be a finite number > 0, got {lr!r}")
        if max_steps is not None and not (isinstance(max_steps, int) and 1 <= max_steps <= self.max_steps):
            raise RequestError(f"max_steps must be a whole number from 1 to {self.max_steps}, got {max_steps!r}")
        if layers is not None:
            self.count(list(layers), "layers", lm.num_layers)
