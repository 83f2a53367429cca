"""Teacher-forced target scoring and the CounterFact metrics, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny

from kvedit import EditRequest, counterfact_case_metrics, summarize_counterfact
from kvedit.evaluation import TokenScores, encode_target, score_targets, target_nll


def manual_nll(lm, prompt: str, target: str) -> float:
    """Mean NLL of target tokens, from one unpadded forward pass, written out by hand."""
    p_ids = lm.tokenizer(prompt)["input_ids"]
    t_ids = lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    return -sum(logprobs[len(p_ids) - 1 + j, t].item() for j, t in enumerate(t_ids)) / len(t_ids)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_target_nll_equals_hand_computation_with_padding(family):
    lm = tiny(family)
    prompts = ["the eiffel tower is located in the city of", "berlin is the capital of", "rome"]
    targets = ["paris", "germany and spain", "is"]
    got = target_nll(lm, prompts, targets, batch_size=2)  # mixed lengths: right padding inside a batch
    want = [manual_nll(lm, p, t) for p, t in zip(prompts, targets)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_scores_apply_a_final_logit_soft_cap_as_the_model_does():
    """A config with `final_logit_softcapping` (Gemma-2 style): scoring unembeds only the target positions and
    must cap them as the model's forward caps every logit."""
    lm = tiny("gemma3_text")
    lm.model.config.final_logit_softcapping = 0.05  # the tiny model's logits are small: a cap that binds
    prompts, targets = ["the eiffel tower is located in the city of", "rome"], ["paris", "is"]
    want = [manual_nll(lm, p, t) for p, t in zip(prompts, targets)]
    assert target_nll(lm, prompts, targets).tolist() == pytest.approx(want, abs=1e-5)
    lm.model.config.final_logit_softcapping = None
    assert target_nll(lm, prompts, targets).tolist() != pytest.approx(want, abs=1e-3)  # the cap mattered


def test_multi_token_target_positions():
    lm = tiny("llama")
    enc = encode_target(lm, "berlin is the capital of", "germany and spain")
    n_prompt = len(lm.tokenizer("berlin is the capital of")["input_ids"])
    assert len(enc.target_ids) == 3
    assert enc.positions == tuple(range(n_prompt - 1, n_prompt + 2))
    assert enc.input_ids[n_prompt:] == enc.target_ids


def test_masked_model_scores_mask_positions():
    lm = tiny("bert")
    enc = encode_target(lm, "berlin is the capital of", "germany")
    ids = torch.tensor([enc.input_ids])
    assert ids[0, enc.positions[0]] == lm.tokenizer.mask_token_id
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0], -1)
    want = -logprobs[enc.positions[0], enc.target_ids[0]].item()
    assert target_nll(lm, ["berlin is the capital of"], ["germany"]).item() == pytest.approx(want, abs=1e-5)


def test_token_accuracy_counts_argmax_hits():
    lm = tiny("llama")
    scores = score_targets(lm, ["berlin is the capital of"], ["germany and spain"])
    enc = encode_target(lm, "berlin is the capital of", "germany and spain")
    with torch.no_grad():
        argmax = lm.model(torch.tensor([enc.input_ids])).logits[0].argmax(-1)
    hits = [int(argmax[p] == t) for p, t in zip(enc.positions, enc.target_ids)]
    assert scores.token_accuracy.item() == pytest.approx(sum(hits) / len(hits))


def test_bundled_tokenizer_keeps_target_tokens_at_the_boundary(bundled_lm):
    """SmolLM2's BPE: the joint tokenisation ends with the target's own tokens."""
    for prompt, target in [
        ("The Eiffel Tower is located in the city of", "Paris"),
        ("The capital of Japan is", "Tokyo"),
    ]:
        enc = encode_target(bundled_lm, prompt, target)
        alone = bundled_lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        assert list(enc.target_ids) == alone
        assert bundled_lm.tokenizer.decode(list(enc.target_ids)) == " " + target


def test_counterfact_metrics_equal_hand_computation(monkeypatch):
    """Metrics from fixed NLLs: success compares NLLs, magnitudes are e^-NLL differences, Score is a hmean."""
    import kvedit.evaluation.counterfact as cf

    requests = [
        EditRequest(
            "{} is in", "a", "x", "y", paraphrase_prompts=("p1", "p2"), neighborhood_prompts=("n1", "n2", "n3")
        ),
        EditRequest("{} lies in", "b", "x", "y", paraphrase_prompts=("q1",), neighborhood_prompts=("m1",)),
    ]
    # (NLL_new, NLL_true) per prompt in order: rewrite, paraphrases, neighborhoods
    pairs = [(0.1, 2.0), (0.5, 1.0), (3.0, 1.0), (2.0, 0.2), (0.3, 0.9), (1.5, 0.5), (2.5, 0.4), (0.2, 0.1), (1.4, 0.4)]
    flat = torch.tensor([v for pair in pairs for v in pair])
    one_token = torch.ones(len(flat), 1, dtype=torch.bool)  # each target one token with log-probability −NLL
    fixed = TokenScores(-flat[:, None], torch.zeros(len(flat), 1, dtype=torch.long), ~one_token, one_token)
    monkeypatch.setattr(cf, "score_targets", lambda lm, prompts, targets, batch_size: fixed)
    cases = counterfact_case_metrics(None, requests)
    e = math.exp
    assert cases[0]["efficacy_success"] == 1.0
    assert cases[0]["paraphrase_success"] == 0.5
    assert cases[0]["neighborhood_success"] == pytest.approx(2 / 3)
    assert cases[0]["paraphrase_magnitude"] == pytest.approx(((e(-0.5) - e(-1.0)) + (e(-3.0) - e(-1.0))) / 2)
    assert cases[0]["neighborhood_magnitude"] == pytest.approx(
        ((e(-0.2) - e(-2.0)) + (e(-0.9) - e(-0.3)) + (e(-0.5) - e(-1.5))) / 3
    )
    assert cases[1]["efficacy_success"] == 0.0 and cases[1]["paraphrase_success"] == 0.0
    assert cases[1]["neighborhood_success"] == 1.0

    summary = summarize_counterfact(cases)
    assert summary["efficacy_success"] == pytest.approx(50.0)
    assert summary["paraphrase_success"] == pytest.approx(25.0)
    assert summary["neighborhood_success"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    rates = [50.0, 25.0, 100 * (2 / 3 + 1) / 2]
    assert summary["score"] == pytest.approx(3 / sum(1 / r for r in rates))


def test_missing_groups_are_none_not_zero():
    summary = summarize_counterfact([{"efficacy_success": 1.0, "efficacy_magnitude": 0.5}])
    assert summary["efficacy_success"] == 100.0
    assert summary["paraphrase_success"] is None and summary["score"] is None
