"""MQuAKE metrics (evaluation/multihop.py): answer cut-off and normalisation, multi-hop / single-hop accuracy and
the probability form against greedy decoding and NLLs written out by hand on a tiny model, and three real
MQuAKE-hard records."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from test_propagation import SHARED, _hand_nll, shared_file, tiny_qa_lm

from kvedit.data import EditRequest
from kvedit.data.propagation import MquakeCase, load_mquake
from kvedit.evaluation.multihop import (
    answer_matches,
    cut_answer,
    known_multihop,
    multihop_case_metrics,
    normalize_answer,
    question_prompt,
    summarize_multihop,
)

FEWSHOT = "paris is the capital of france and rome is the capital of italy "
MAX_NEW = 3


def _hand_greedy(lm, prompt: str, max_new_tokens: int = MAX_NEW) -> str:
    """Greedy decoding written out: full forward each step, argmax, stop at end-of-text; decode; cut."""
    ids = lm.tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == lm.tokenizer.eos_token_id:
                break
    return cut_answer(lm.tokenizer.decode(new, skip_special_tokens=True))


def _case(new_answers: tuple[str, ...], answers: tuple[str, ...], edit_answers) -> MquakeCase:
    requests = (
        EditRequest(
            prompt="{} is located in", subject="the louvre", target_new="rome", target_true="paris", case_id="m/0"
        ),
        EditRequest(
            prompt="the language of {} is", subject="rome", target_new="german", target_true="italian", case_id="m/1"
        ),
    )
    return MquakeCase(
        case_id="m",
        requests=requests,
        edit_questions=("where is the louvre", "which language is spoken in rome"),
        edit_answers=edit_answers,
        questions=(
            "which language is spoken in the city of the louvre",
            "the louvre city language is",
            "what language is spoken where the louvre stands",
        ),
        answers=answers,
        new_answers=new_answers,
        single_hops=(),
        new_single_hops=(),
    )


def test_cut_and_normalize() -> None:
    assert cut_answer(" Arabic\nQ: What is ...") == "Arabic"
    assert cut_answer(" Arabic Q: next question") == "Arabic"
    assert cut_answer("  IQ: a test") == "IQ: a test"  # only a "Q:" that starts a word ends the answer
    assert normalize_answer("The U.K.") == "uk"
    assert normalize_answer("  Arabic   language. ") == "arabic language"
    assert normalize_answer("Ｂｅｒｌｉｎ!") == "berlin"  # NFKC folds full-width letters
    assert answer_matches("the United Kingdom.", ("United Kingdom", "UK"))
    assert answer_matches("U.K.", ("United Kingdom", "UK"))
    assert not answer_matches("United Kingdom of Great Britain", ("United Kingdom",))  # exact, not containment
    assert not answer_matches("", ("",)) and not answer_matches("the", ("a",))  # nothing left: never a match


def test_multihop_metrics_match_hand_computation() -> None:
    lm = tiny_qa_lm()
    assert lm.tokenizer.unk_token_id not in lm.tokenizer(question_prompt("where is the louvre", FEWSHOT))["input_ids"]
    probe = _case(("x",), ("x",), (("x",), ("x",)))
    generated = [_hand_greedy(lm, question_prompt(q, FEWSHOT)) for q in probe.questions]
    hops = [_hand_greedy(lm, question_prompt(q, FEWSHOT)) for q in probe.edit_questions]
    assert all(normalize_answer(a) for a in generated + hops), "the hand answers should be non-empty words"
    # the new answer's alias is what the model says to question 2; the old answer is nothing it says
    hit = _case(("berlin", generated[1].upper() + "."), ("madrid",), ((hops[0],), ("madrid berlin",)))
    miss = _case(("madrid spain",), (generated[2],), (("madrid",), ("madrid",)))
    got = multihop_case_metrics(lm, [hit, miss], fewshot=FEWSHOT, max_new_tokens=MAX_NEW, batch_size=3)
    assert got[0]["multihop_answers"] == generated and got[0]["single_hop_answers"] == hops
    assert (got[0]["multihop_accuracy"], got[0]["multihop_old_accuracy"], got[0]["single_hop_accuracy"]) == (1, 0, 0.5)
    assert (got[1]["multihop_accuracy"], got[1]["multihop_old_accuracy"], got[1]["single_hop_accuracy"]) == (0, 1, 0)

    # probability form: the new vs the old answer's mean token NLL after each question
    pairs = [
        (_hand_nll(lm, question_prompt(q, FEWSHOT), "berlin"), _hand_nll(lm, question_prompt(q, FEWSHOT), "madrid"))
        for q in hit.questions
    ]
    wins = [new < old for new, old in pairs]
    assert got[0]["multihop_prob_accuracy"] == pytest.approx(sum(wins) / 3)
    assert got[0]["multihop_prob_any"] == float(any(wins))
    assert got[0]["multihop_nll_margin"] == pytest.approx(sum(old - new for new, old in pairs) / 3, abs=1e-5)
    hop_wins = [
        _hand_nll(lm, question_prompt(q, FEWSHOT), r.target_new)
        < _hand_nll(lm, question_prompt(q, FEWSHOT), r.target_true)
        for q, r in zip(hit.edit_questions, hit.requests)
    ]
    assert got[0]["single_hop_prob_accuracy"] == pytest.approx(sum(hop_wins) / 2)
    assert known_multihop(lm, [hit], fewshot=FEWSHOT) == [any(old < new for new, old in pairs)]

    summary = summarize_multihop(got)
    assert summary["n"] == 2 and summary["multihop_accuracy"] == pytest.approx(50.0)
    assert summary["single_hop_accuracy"] == pytest.approx(25.0)
    assert summary["multihop_nll_margin"] == pytest.approx(
        (got[0]["multihop_nll_margin"] + got[1]["multihop_nll_margin"]) / 2
    )


def test_masked_models_are_refused() -> None:
    with pytest.raises(ValueError, match="causal model"):
        multihop_case_metrics(tiny("bert"), [_case(("a",), ("b",), (("a",), ("b",)))])


def test_real_mquake_records() -> None:
    cases = load_mquake(shared_file("mquake"), limit=3)
    assert [len(c.requests) for c in cases] == [4, 4, 4] and [len(c.questions) for c in cases] == [3, 3, 3]
    first = cases[0]
    assert first.case_id == 7417 and first.new_answers[0] == "Arabic" and "English language" in first.answers
    assert first.requests[3].rewrite_prompt == "The official language of Australia is"
    assert first.edit_answers[2][0] == "Australia" and "AUS" in first.edit_answers[2]
    lm = tiny_qa_lm([t for c in cases for t in (*c.questions, *c.edit_questions, *c.answers, *c.new_answers)])
    got = multihop_case_metrics(lm, cases, max_new_tokens=2)
    for case, metrics in zip(cases, got):
        answers = [_hand_greedy(lm, question_prompt(q), 2) for q in case.questions]
        assert metrics["multihop_answers"] == answers
        assert metrics["multihop_accuracy"] == float(any(answer_matches(a, case.new_answers) for a in answers))
        nll = [
            (_hand_nll(lm, question_prompt(q), case.new_answers[0]), _hand_nll(lm, question_prompt(q), case.answers[0]))
            for q in case.questions
        ]
        assert metrics["multihop_prob_accuracy"] == pytest.approx(sum(n < o for n, o in nll) / 3)
    assert SHARED["mquake"].is_file()
