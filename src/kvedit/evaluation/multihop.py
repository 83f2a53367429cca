"""MQuAKE metrics: after all of a case's edits, does the model answer the multi-hop question with the new answer?

Prompting (MQuAKE queries models with in-context "Q: … A: …" demonstrations so a base model answers briefly):
every question is asked as ``fewshot + "Q: " + question + " A:"``. `DEFAULT_FEWSHOT` is kvedit's own five
demonstrations (general facts, none from MQuAKE); pass MQuAKE's ``prompts/multihop-prompts.txt`` text (with a
trailing newline) as `fewshot` to use the paper's.

Generative form (MQuAKE's definition; `run_mello` counts a case correct when the answer to any of its questions
equals ``new_answer`` or one of its aliases):

- answer: greedy decoding of at most `max_new_tokens` (default 16) new tokens; the text is cut at the first
  newline and at a following ``"Q:"`` (the demonstrations' format), then `normalize_answer`d;
- match: the normalised answer equals a normalised ``new_answer`` or alias (exact, not containment);
- ``multihop_accuracy``: 1 if the answer to ANY of the case's questions matches, else 0;
  ``multihop_old_accuracy``: the same against the pre-edit ``answer`` and aliases (on the unedited model: the
  rate the model can answer the question at all);
- ``single_hop_accuracy``: mean over the case's edits of [the answer to the edit's ``question`` matches its
  target_new or aliases] — the question form of each edited fact (the cloze form is kvedit's efficacy).

Probability form (small models rarely produce a multi-word answer verbatim), teacher-forced mean token NLL of
``new_answer`` vs ``answer`` (main strings, not aliases) after each question prompt:

- ``multihop_prob_accuracy``: mean over questions of [NLL(new) < NLL(old)]; ``multihop_prob_any``: 1 if so on
  any question; ``multihop_nll_margin``: mean over questions of NLL(old) − NLL(new), nats per token;
- ``single_hop_prob_accuracy``: mean over edits of [NLL(target_new) < NLL(target_true)] after the edit's
  question prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.propagation import MquakeCase
from ..models.lm import LM
from .scoring import target_nll

DEFAULT_FEWSHOT = (
    "Q: What is the capital of the country where the Eiffel Tower stands? A: Paris\n"
    "Q: Which language is spoken in the country whose capital is Madrid? A: Spanish\n"
    "Q: Who founded the company that makes the Windows operating system? A: Bill Gates\n"
    "Q: On which continent is the country where the Colosseum is located? A: Europe\n"
    "Q: What is the currency of the country where Mount Fuji is located? A: Japanese yen\n"
)
MULTIHOP_METRICS: tuple[str, ...] = (
    "multihop_accuracy",
    "multihop_old_accuracy",
    "single_hop_accuracy",
    "multihop_prob_accuracy",
    "multihop_prob_any",
    "multihop_nll_margin",
    "single_hop_prob_accuracy",
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def question_prompt(question: str, fewshot: str = DEFAULT_FEWSHOT) -> str:
    """The text the model reads for `question`: the demonstrations, then ``Q: question A:``."""
    return f"{fewshot}Q: {question.strip()} A:"


def cut_answer(text: str) -> str:
    """The answer part of a continuation: up to the first newline, and before a ``Q:`` that starts a new
    demonstration on the same line; stripped."""
    line = text.split("\n", 1)[0]
    return re.split(r"\s?\bQ:", line, maxsplit=1)[0].strip()


def normalize_answer(text: str) -> str:
    """NFKC, lower case, punctuation (Unicode P*) dropped, the articles a/an/the dropped, whitespace collapsed:
    ``"The U.K."`` -> ``"uk"``."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(answer: str, accepted: Sequence[str]) -> bool:
    """Exact match after `normalize_answer` with any of `accepted` (an empty answer never matches)."""
    got = normalize_answer(answer)
    return bool(got) and any(got == normalize_answer(a) for a in accepted)


@torch.no_grad()
def greedy_continuations(lm: LM, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    """Per prompt, the greedy continuation (at most `max_new_tokens` new tokens, stopping early at end-of-text),
    decoded without special tokens. Batches are left-padded."""
    if lm.arch.objective != "causal":
        raise ValueError(f"{lm.name}: multi-hop answers need a causal model that generates, not a masked one")
    tok = lm.tokenizer
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left").to(lm.device)
        ids = lm.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        width = enc["input_ids"].shape[1]
        out += [str(tok.decode(row[width:], skip_special_tokens=True)) for row in ids]
    return out


def multihop_case_metrics(
    lm: LM,
    cases: Sequence[MquakeCase],
    fewshot: str = DEFAULT_FEWSHOT,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """One dict per case with the metrics of the module docstring (fractions; `multihop_nll_margin` in nats)
    and, for inspection, ``multihop_answers`` / ``single_hop_answers`` (the cut answers). Call it on the model
    with all of the case's edits applied (or on the unedited model for its rates)."""
    prompts: list[str] = []
    for case in cases:
        prompts += [question_prompt(q, fewshot) for q in (*case.questions, *case.edit_questions)]
    texts = iter([cut_answer(t) for t in greedy_continuations(lm, prompts, max_new_tokens, batch_size)])
    # probability form: new vs old answer after every question prompt
    nll_prompts: list[str] = []
    nll_targets: list[str] = []
    for case in cases:
        for q in case.questions:
            nll_prompts += [question_prompt(q, fewshot)] * 2
            nll_targets += [case.new_answers[0], case.answers[0]]
        for q, request in zip(case.edit_questions, case.requests):
            nll_prompts += [question_prompt(q, fewshot)] * 2
            nll_targets += [request.target_new, request.target_true or ""]
    nll = iter(target_nll(lm, nll_prompts, nll_targets, batch_size).tolist()) if nll_prompts else iter(())
    out: list[dict[str, Any]] = []
    for case in cases:
        answers = [next(texts) for _ in case.questions]
        hops = [next(texts) for _ in case.edit_questions]
        pairs = [(next(nll), next(nll)) for _ in case.questions]  # (new, old)
        hop_pairs = [(next(nll), next(nll)) for _ in case.edit_questions]
        new_wins = [new < old for new, old in pairs]
        out.append(
            {
                "case_id": case.case_id,
                "multihop_accuracy": float(any(answer_matches(a, case.new_answers) for a in answers)),
                "multihop_old_accuracy": float(any(answer_matches(a, case.answers) for a in answers)),
                "single_hop_accuracy": _mean(
                    [answer_matches(a, accepted) for a, accepted in zip(hops, case.edit_answers)]
                ),
                "multihop_prob_accuracy": _mean(new_wins),
                "multihop_prob_any": float(any(new_wins)),
                "multihop_nll_margin": _mean([old - new for new, old in pairs]),
                "single_hop_prob_accuracy": _mean([new < old for new, old in hop_pairs]),
                "multihop_answers": answers,
                "single_hop_answers": hops,
            }
        )
    return out


def _mean(values: Sequence[float | bool]) -> float:
    return sum(float(v) for v in values) / len(values)


def summarize_multihop(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``n`` and the mean over cases of every metric in `MULTIHOP_METRICS` (× 100, except the NLL margin, in
    nats); None when no case has it."""
    summary: dict[str, Any] = {"n": len(cases)}
    for metric in MULTIHOP_METRICS:
        values = [c[metric] for c in cases if metric in c]
        scale = 1.0 if metric == "multihop_nll_margin" else 100.0
        summary[metric] = scale * sum(values) / len(values) if values else None
    return summary


def known_multihop(
    lm: LM, cases: Sequence[MquakeCase], fewshot: str = DEFAULT_FEWSHOT, batch_size: int = 16
) -> list[bool]:
    """Per case: does the unedited model prefer the pre-edit answer to the new one (lower mean token NLL) on at
    least one of its questions? (docs/propagation.md: MQuAKE's "known" rule.)"""
    prompts: list[str] = []
    targets: list[str] = []
    for case in cases:
        for q in case.questions:
            prompts += [question_prompt(q, fewshot)] * 2
            targets += [case.answers[0], case.new_answers[0]]
    if not prompts:
        return []
    nll = iter(target_nll(lm, prompts, targets, batch_size).tolist())
    flags = []
    for case in cases:
        pairs = [(next(nll), next(nll)) for _ in case.questions]
        flags.append(any(old < new for old, new in pairs))
    return flags
