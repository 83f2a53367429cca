"""What the explorer is told: the session's settings (`ExploreSettings`) and one edit form as the page sends it
(`EditForm`), with the check that turns a typed prompt into a request template (`edit_template`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..data.requests import RequestError
from .limits import Limits


@dataclass(frozen=True)
class ExploreSettings:
    """corpus / mine_tokens / mine_k / mine_rank: what on-the-fly mining reads (a text file, a folder of .txt
    files, `hf:<dataset>` or `self`), keeps, and ranks by ("value": the signed coefficient, "abs": |m|); stats_source / stats_tokens: the key-statistics corpus of
    ROME/MEMIT/PMET (None: the preset's); top_memories / top_tokens / next_tokens: sizes of the views;
    prefetch_values: project every layer's values in the background so prompts answer faster; limits: the
    bounds on one request (`limits.Limits`)."""

    corpus: str = "self"
    mine_tokens: int = 20_000
    mine_k: int = 20
    mine_rank: Literal["value", "abs"] = "value"
    stats_source: str | None = None
    stats_tokens: int | None = None
    top_memories: int = 10
    top_tokens: int = 5
    next_tokens: int = 10
    prefetch_values: bool = True
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        for name in ("mine_tokens", "mine_k", "top_memories", "top_tokens", "next_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mine_tokens > self.limits.mine_tokens:
            raise ValueError(f"mine_tokens must be at most {self.limits.mine_tokens}, got {self.mine_tokens}")
        if self.mine_rank not in ("value", "abs"):
            raise ValueError(f"mine_rank must be 'value' or 'abs', got {self.mine_rank!r}")
        if self.stats_tokens is not None and self.stats_tokens < 1:
            raise ValueError(f"stats_tokens must be at least 1, got {self.stats_tokens}")


@dataclass(frozen=True)
class EditForm:
    """What the edit form sends. `prompt` holds the subject written out (or `{}` where it goes);
    `target_true` None means the model's own greedy answer; `layers` None the method's preset."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    method: str = "ft-keys"
    layers: tuple[int, ...] | None = None
    lr: float | None = None
    max_steps: int | None = None


def edit_template(prompt: str, subject: str) -> str:
    """The request template of a prompt that contains `subject` (its first occurrence becomes `{}`)."""
    if not prompt or not prompt.strip():
        raise RequestError(
            "the prompt is empty; type the sentence that should end in the new object, "
            "e.g. 'The Eiffel Tower is located in the city of'"
        )
    if not subject or not subject.strip():
        raise RequestError("the subject is empty; type the entity to edit, e.g. 'Eiffel Tower'")
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise RequestError(
            f"the prompt {prompt!r} does not contain the subject {subject!r}; write the subject in "
            "the prompt exactly as in the subject field (or put {} where it goes)"
        )
    return prompt.replace(subject, "{}", 1)
