"""One fact as a user looks at it: the model's own answer, and p(new), p(true) on each of its prompts."""

from __future__ import annotations

import torch

from ..data.requests import EditRequest
from ..models.lm import LM
from .counterfact import GROUPS, counterfact_case_metrics


class NoAnswerError(ValueError):
    """The model generates no word after the prompt."""


@torch.no_grad()
def greedy_answer(lm: LM, prompt: str, max_new_tokens: int = 6) -> str:
    """The model's own greedy answer to `prompt`: its first generated word, without punctuation."""
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    out = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    words = str(lm.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)).split()
    answer = words[0].strip(".,;:!?\"'") if words else ""
    if not answer:
        raise NoAnswerError(f"the model gives no answer to {prompt!r}; pass the true object explicitly")
    return answer


def target_probabilities(lm: LM, request: EditRequest) -> dict[str, list[dict[str, float]]]:
    """Per prompt group (efficacy = the rewrite prompt, paraphrase, neighborhood), one entry per prompt:
    {"target_new": p, "target_true": p} with p = e^(−mean token NLL) of the target after the prompt."""
    case = counterfact_case_metrics(lm, [request])[0]
    return {
        group: [{"target_new": a, "target_true": b} for a, b in zip(case[f"{group}_p_new"], case[f"{group}_p_true"])]
        for group in GROUPS
        if f"{group}_p_new" in case
    }
