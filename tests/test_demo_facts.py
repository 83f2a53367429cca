"""The built-in demo facts: well-formed requests, about facts the bundled model really knows."""

from __future__ import annotations

import re

import pytest

from kvedit.data.demo_facts import demo_requests
from kvedit.evaluation.scoring import target_nll


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def test_demo_requests_are_well_formed() -> None:
    requests = demo_requests()
    assert len(requests) >= 40
    subjects = [r.subject for r in requests]
    assert len(set(subjects)) == len(subjects), "two requests edit the same subject"
    case_ids = [r.case_id for r in requests]
    assert len(set(case_ids)) == len(case_ids), "case_ids are not unique"
    for r in requests:
        assert r.target_true is not None, r.case_id
        prompts = [r.rewrite_prompt, *r.paraphrase_prompts]
        assert len(set(prompts)) == len(prompts), ("a paraphrase repeats a prompt", r.case_id)
        assert r.target_true == r.target_true.strip() and r.target_new == r.target_new.strip(), r.case_id
        assert len(r.paraphrase_prompts) >= 2, r.case_id
        assert len(r.neighborhood_prompts) >= 3, r.case_id
        for prompt in r.paraphrase_prompts:
            assert r.subject in prompt, (r.case_id, prompt)
        for prompt in r.neighborhood_prompts:
            assert not _has_word(prompt, r.subject), (r.case_id, prompt)
        for prompt in (r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts):
            assert prompt == prompt.strip() and "{}" not in prompt, (r.case_id, prompt)
            for target in (r.target_true, r.target_new):
                assert not _has_word(prompt, target), (r.case_id, prompt, target)


def test_prompts_do_not_mention_other_requests_subjects() -> None:
    """So that applying several demo edits at once cannot change another request's test prompts."""
    requests = demo_requests()
    for r in requests:
        for prompt in (*r.paraphrase_prompts, *r.neighborhood_prompts):
            others = [o.case_id for o in requests if o is not r and _has_word(prompt, o.subject)]
            assert not others, (r.case_id, prompt, others)


@pytest.mark.bundled
def test_bundled_model_prefers_true_target_on_every_rewrite_prompt(bundled_lm) -> None:
    """`bundled_lm` is the session fixture in conftest.py (skips when the model is not installed)."""
    requests = demo_requests()
    prompts = [r.rewrite_prompt for r in requests]
    nll_true = target_nll(bundled_lm, prompts, [r.target_true for r in requests])
    nll_new = target_nll(bundled_lm, prompts, [r.target_new for r in requests])
    ok = (nll_true < nll_new).tolist()
    wrong = [f"{r.case_id}: {r.rewrite_prompt!r} -> {r.target_new!r}" for r, good in zip(requests, ok) if not good]
    assert not wrong, "the unedited model prefers target_new on:\n" + "\n".join(wrong)
