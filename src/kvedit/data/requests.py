"""Edit requests: one fact to change, with the prompts used to judge the change."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any


class RequestError(ValueError):
    """An edit request that cannot be carried out as written."""


def check_text(value: Any, field: str, max_chars: int | None = None) -> str:
    """`value` if it is text a tokenizer can read; else raise `RequestError` naming `field`.

    Refuses a non-string, text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, which JSON
    can carry but UTF-8 cannot encode), NUL characters, and, with `max_chars`, text longer than that.
    """
    if not isinstance(value, str):
        raise RequestError(f"{field} must be text, got {type(value).__name__} {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(
            f"{field} holds a character that is not valid Unicode ({value[err.start]!r} at "
            f"position {err.start}: a lone surrogate); send the text as valid UTF-8"
        ) from None
    if "\x00" in value:
        raise RequestError(f"{field} holds a NUL character (at position {value.index(chr(0))}); remove it")
    if max_chars is not None and len(value) > max_chars:
        raise RequestError(f"{field} is {len(value)} characters long; at most {max_chars} are accepted")
    return value


@dataclass(frozen=True)
class EditRequest:
    """Change `(subject, relation) -> target_true` into `target_new`.

    `prompt` is the relation template with `{}` where the subject goes, e.g.
    ``"{} is located in the city of"``. Targets are written without a leading space;
    scoring puts one between prompt and target, as the reference code does.

    paraphrase_prompts: other wordings of the same fact (subject written out).
    neighborhood_prompts: prompts about *other* subjects whose answer is `target_true`
        and must stay so (specificity).
    generation_prompts: open prompts for fluency / consistency.
    neighborhood_target: the answer neighborhood prompts must keep when it is not
        `target_true` (zsRE's `loc_ans`); None means `target_true`.
    attribute: `"relation_id/target_new_id"` (CounterFact's ids), the key of the attribute
        snippets that consistency compares generations with.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = None
    case_id: str | int | None = None
    attribute: str | None = None

    def __post_init__(self) -> None:
        for name in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    @property
    def rewrite_prompt(self) -> str:
        """The template with the subject written out."""
        return self.prompt.replace("{}", self.subject)

    def validate(self) -> None:
        """Raise `RequestError` naming the field that is wrong."""
        who = f"request {self.case_id!r}" if self.case_id is not None else "request"
        for name in ("prompt", "subject", "target_new", "target_true", "neighborhood_target", "attribute"):
            if getattr(self, name) is not None:
                check_text(getattr(self, name), f"{who}: {name}")
        for name in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            for i, text in enumerate(getattr(self, name)):
                check_text(text, f"{who}: {name}[{i}]")
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise RequestError(
                f"{who}: prompt must contain exactly one '{{}}' where the subject goes, "
                f"e.g. '{{}} is located in the city of'; got {self.prompt!r}"
            )
        if not self.subject or not self.subject.strip():
            raise RequestError(f"{who}: subject is empty; expected the entity to edit, e.g. 'Eiffel Tower'")
        if not self.target_new or not self.target_new.strip():
            raise RequestError(f"{who}: target_new is empty; expected the new object, e.g. 'Rome'")
        if self.target_true is not None:
            if not self.target_true.strip():
                raise RequestError(f"{who}: target_true is empty; leave it out (None) or give the current object")
            if self.target_true.strip() == self.target_new.strip():
                raise RequestError(f"{who}: target_new equals target_true ({self.target_new!r}); nothing to edit")
        template = self.prompt.replace("{}", " ")
        for name in ("target_new", "target_true"):
            target = getattr(self, name)
            if target is not None and _contains_word(template, target.strip()):
                raise RequestError(
                    f"{who}: the prompt {self.prompt!r} already contains {name} {target!r}; "
                    "it must stop right before the object and not state it"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise RequestError(f"unknown request field(s) {sorted(extra)}; expected some of {sorted(known)}")
        return cls(**d)


def _contains_word(text: str, word: str) -> bool:
    """True if `word` stands in `text` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None
