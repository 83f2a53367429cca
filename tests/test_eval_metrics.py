"""Evaluation metrics beyond CounterFact's probabilities, each against a value computed by hand:
zsRE token accuracy, fluency (n-gram entropy), TF-IDF consistency, seeded generation, and the
statistics of summaries (bootstrap intervals, sign test, Score)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from kvedit.data.requests import EditRequest
from kvedit.evaluation.comparison import bootstrap_ci, mean_with_ci, paired_comparison, sign_test
from kvedit.evaluation.counterfact import counterfact_case_metrics
from kvedit.evaluation.easyedit import add_locality, locality_unchanged
from kvedit.evaluation.generation import (
    generate_ids,
    generate_texts,
    generation_case_metrics,
    load_attribute_snippets,
    ngram_entropy,
    tfidf_similarity,
)
from kvedit.evaluation.summary import easyedit_table, markdown_table, summarize_run, summary_csv
from kvedit.evaluation.suites import SUITES
from kvedit.evaluation.zsre import summarize_zsre, zsre_case_metrics


def _argmax_after(lm, text: str) -> int:
    """The model's next-token argmax after `text`, from its own forward pass."""
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return int(lm.model(input_ids=ids).logits[0, -1].argmax())


def _reference_accuracy(lm, prompt: str, answer: str) -> float:
    """REFERENCE §6 by hand: for each token t_i of " " + answer, is argmax(prompt + decode(t_<i)) == t_i."""
    tok = lm.tokenizer
    targets = tok(" " + answer, add_special_tokens=False)["input_ids"]
    hits = [
        _argmax_after(lm, prompt + (" " + tok.decode(targets[:i]) if i else "")) == t for i, t in enumerate(targets)
    ]
    return sum(hits) / len(hits)


def test_zsre_token_accuracy_matches_the_reference_definition(tiny_llama):
    lm = tiny_llama
    # pick answers the random model partly predicts: its own greedy continuation, then a changed token
    prompt = "the eiffel tower is located in"
    first = lm.tokenizer.decode([_argmax_after(lm, prompt)]).strip()
    request = EditRequest(
        "{} is located in",
        "the eiffel tower",
        target_new=f"{first} city rome",
        paraphrase_prompts=("where is the eiffel tower",),
        neighborhood_prompts=("the louvre is located in",),
        neighborhood_target="paris",
    )
    case = zsre_case_metrics(lm, [request])[0]
    assert case["efficacy_accuracy"] == pytest.approx(_reference_accuracy(lm, prompt, f"{first} city rome"))
    assert case["efficacy_accuracy"] >= 1 / 3  # the first token is the model's own argmax
    assert case["paraphrase_accuracy"] == pytest.approx(
        _reference_accuracy(lm, "where is the eiffel tower", f"{first} city rome")
    )
    assert case["neighborhood_accuracy"] == pytest.approx(_reference_accuracy(lm, "the louvre is located in", "paris"))
    summary = summarize_zsre(
        [case, {"case_id": 1, "efficacy_accuracy": 0.0, "paraphrase_accuracy": 1.0, "neighborhood_accuracy": 0.5}]
    )
    assert summary["efficacy_accuracy"] == pytest.approx(50 * case["efficacy_accuracy"])


def _predictions_along(lm, prompt: str, answer: str) -> list[int]:
    """By hand: the argmax after prompt + decode(a_<i) for each token a_i of " " + answer."""
    tok = lm.tokenizer
    targets = tok(" " + answer, add_special_tokens=False)["input_ids"]
    return [_argmax_after(lm, prompt + (" " + tok.decode(targets[:i]) if i else "")) for i in range(len(targets))]


def test_easyedit_definitions_by_hand(tiny_llama):
    lm = tiny_llama
    request = EditRequest(
        "{} is located in",
        "the eiffel tower",
        target_new="rome city",
        target_true="paris",
        paraphrase_prompts=("where is the eiffel tower", "the eiffel tower lies in"),
        neighborhood_prompts=("the louvre is located in",),
        neighborhood_target="paris france",
    )
    case = counterfact_case_metrics(lm, [request])[0]
    # rewrite / rephrase accuracy: teacher-forced token accuracy of target_new, mean over paraphrases
    assert case["efficacy_token_accuracy"] == pytest.approx(
        _reference_accuracy(lm, "the eiffel tower is located in", "rome city")
    )
    assert case["paraphrase_token_accuracy"] == pytest.approx(
        (
            _reference_accuracy(lm, "where is the eiffel tower", "rome city")
            + _reference_accuracy(lm, "the eiffel tower lies in", "rome city")
        )
        / 2
    )
    # locality compares argmax tokens along the neighborhood's true answer before and after an edit
    before = _predictions_along(lm, "the louvre is located in", "paris france")
    assert case["neighborhood_argmax"] == [before]

    def ban_first_prediction(module, inputs, logits):  # an "edit" that changes some predictions
        logits[..., before[0]] = -1e4
        return logits

    hook = lm.model.get_output_embeddings().register_forward_hook(ban_first_prediction)
    try:
        after = counterfact_case_metrics(lm, [request])
    finally:
        hook.remove()
    assert after[0]["neighborhood_argmax"][0][0] != before[0]
    changed = [a != b for a, b in zip(after[0]["neighborhood_argmax"][0], before)]
    add_locality(after, {request.case_id: [before]})
    assert after[0]["neighborhood_unchanged"] == pytest.approx(1 - sum(changed) / len(changed))


def test_locality_unchanged_by_hand():
    # prompt 1: 2 of 3 positions unchanged; prompt 2: 0 of 1 -> mean over prompts (2/3 + 0) / 2
    assert locality_unchanged([[1, 2, 3], [4]], [[1, 0, 3], [5]]) == pytest.approx(1 / 3)
    assert locality_unchanged([[7, 8]], [[7, 8]]) == 1.0
    with pytest.raises(ValueError, match="prompts"):
        locality_unchanged([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="tokens"):
        locality_unchanged([[1, 2]], [[1]])
    cases = [{"case_id": 0, "neighborhood_argmax": [[1, 2]]}, {"case_id": 1, "neighborhood_argmax": [[3]]}]
    add_locality(cases, {0: [[1, 9]]})  # no reference for case 1: left without the metric, not given 0
    assert cases[0]["neighborhood_unchanged"] == 0.5 and "neighborhood_unchanged" not in cases[1]


def test_easyedit_table_counts_the_cases_that_have_the_metrics():
    suite = SUITES["counterfact"]
    base = {"efficacy_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": 1.0}
    full = [
        base
        | {"case_id": i, "efficacy_token_accuracy": 1.0, "paraphrase_token_accuracy": 0.5, "neighborhood_unchanged": u}
        for i, u in enumerate([1.0, 0.5])
    ]
    partial = [base | {"case_id": 0}, full[1]]  # e.g. a run resumed from an older folder
    none = [base | {"case_id": 0}]
    runs = {
        "memit": summarize_run(full, suite),
        "rome": summarize_run(partial, suite),
        "ft-keys": summarize_run(none, suite),
    }
    table = easyedit_table(runs, suite, with_ci=False)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows == {"memit": ["–", "2", "100.00", "50.00", "75.00"], "rome": ["–", "1", "100.00", "50.00", "50.00"]}
    assert easyedit_table({"ft-keys": runs["ft-keys"]}, suite) is None


def test_zsre_neighborhood_needs_its_answer(tiny_llama):
    request = EditRequest("{} is located in", "rome", target_new="italy", neighborhood_prompts=("paris is in",))
    with pytest.raises(ValueError, match="neighborhood_target"):
        zsre_case_metrics(tiny_llama, [request])


def test_ngram_entropy_by_hand():
    # tokens a b a b: bigrams (a,b)x2 (b,a)x1 -> H = 0.9183; trigrams (a,b,a) (b,a,b) -> H = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Treebank tokens: the final period is its own word, so "a b." has bigrams (a,b) (b,.)
    assert ngram_entropy("a b.") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
    assert ngram_entropy("") == 0.0


def test_tfidf_similarity_by_hand():
    vocab, idf = {"cat": 0, "dog": 1, "fish": 2}, np.array([1.0, 2.0, 3.0])
    # a = [2·1, 1·2, 0] -> [1, 1, 0]/√2; b = [0, 2, 3]/√13; words of one letter are not tokens
    expected = (2 / math.sqrt(2)) / math.sqrt(13)
    assert tfidf_similarity("Cat cat dog x", "dog fish", vocab, idf) == pytest.approx(expected)
    assert tfidf_similarity("bird", "dog", vocab, idf) == 0.0


def test_generation_is_seeded_and_counts_tokens(tiny_llama):
    lm = tiny_llama
    prompts = ["the eiffel tower", "rome is the capital of italy and"]
    a = generate_texts(lm, prompts, total_tokens=12, seed=3)
    b = generate_texts(lm, prompts, total_tokens=12, seed=3)
    assert a == b
    assert generate_texts(lm, prompts, total_tokens=12, seed=4) != a
    for prompt, text, ids in zip(prompts, a, generate_ids(lm, prompts, total_tokens=12, seed=3)):
        assert text.startswith(prompt)
        prompt_ids = lm.tokenizer(prompt)["input_ids"]
        assert len(ids) == 12 and ids[: len(prompt_ids)] == prompt_ids


def test_generation_metrics_are_absent_without_prompts(tiny_llama):
    bare = EditRequest("{} is located in", "rome", target_new="italy")
    with_prompts = EditRequest("{} is located in", "rome", target_new="italy", generation_prompts=("rome is",))
    out = generation_case_metrics(tiny_llama, [bare, with_prompts])
    assert out[0] == {}
    assert out[1]["fluency"] > 0 and "consistency" not in out[1]  # no snippets given: absent, not 0


def test_sign_test_exact_values():
    assert sign_test([1, 1, 1, -1]) == pytest.approx(2 * (1 + 4) / 16)
    assert sign_test([2.0] * 6) == pytest.approx(2 / 64)
    assert sign_test([1, -1, 0, 0]) == 1.0
    assert sign_test([0, 0]) is None


def test_bootstrap_intervals():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    stat = mean_with_ci(values, 100.0)
    assert stat["mean"] == pytest.approx(62.5) and stat["count"] == 8
    low, high = stat["ci"]
    assert low < 62.5 < high and 0 <= low and high <= 100
    assert mean_with_ci(values, 100.0) == stat  # seeded: the same records give the same interval
    assert mean_with_ci([1.0] * 5)["ci"] == [1.0, 1.0]
    assert mean_with_ci([])["mean"] is None
    assert bootstrap_ci(lambda idx: 0.0, 1) is None


def test_paired_comparison():
    result = paired_comparison([1, 1, 0, 1], [0, 1, 0, 0], scale=100)
    assert result["mean_difference"] == pytest.approx(50.0)
    assert (result["wins"], result["losses"], result["ties"]) == (2, 0, 2)
    assert result["sign_test_p"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1], [1, 2])


def test_summary_score_time_and_absent_metrics():
    suite = SUITES["counterfact"]
    records = [
        {
            "case_id": 0,
            "efficacy_success": 1.0,
            "paraphrase_success": 0.5,
            "neighborhood_success": 1.0,
            "time_s": 4.0,
            "batch_size": 2,
        },
        {
            "case_id": 1,
            "efficacy_success": 1.0,
            "paraphrase_success": 1.0,
            "neighborhood_success": 0.0,
            "time_s": 4.0,
            "batch_size": 2,
        },
    ]
    s = summarize_run(records, suite)
    rates = [100.0, 75.0, 50.0]
    assert s["metrics"]["score"]["mean"] == pytest.approx(3 / sum(1 / r for r in rates))
    assert s["metrics"]["fluency"]["mean"] is None  # absent, never 0
    assert s["edit_time_s"] == 4.0 and s["time_per_edit_s"] == 2.0
    slow_first = summarize_run([records[0] | {"time_s": 40.0}, records[1], records[1] | {"case_id": 2}], suite)
    assert slow_first["edit_time_s"] == 16.0 and slow_first["edit_time_median_s"] == 4.0
    table = markdown_table({"ft-keys": s | {"batch_size": 2}}, suite)
    assert "| ft-keys |" in table and "Fluency" not in table
    rows = list(csv.DictReader(io.StringIO(summary_csv({"ft-keys": s}))))
    score = next(r for r in rows if r["metric"] == "score")
    assert float(score["mean"]) == pytest.approx(s["metrics"]["score"]["mean"]) and score["count"] == "2"
    assert next(r for r in rows if r["metric"] == "fluency")["mean"] == ""


def test_consistency_from_official_files(tiny_llama, tmp_path):
    (tmp_path / "attribute_snippets.json").write_text(
        json.dumps(
            [{"relation_id": "P17", "target_id": "Q38", "samples": [{"text": "rome is a city"}, {"text": "rome rome"}]}]
        )
    )
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"rome": 0, "city": 1, "paris": 2, "is": 3}))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0, 0.5]))
    snippets = load_attribute_snippets(tmp_path)
    assert snippets.texts["P17/Q38"] == ["rome is a city", "rome rome"]
    request = EditRequest(
        "{} is located in", "rome", target_new="italy", generation_prompts=("rome is", "the city"), attribute="P17/Q38"
    )
    case = generation_case_metrics(tiny_llama, [request], seed=1, snippets=snippets)[0]
    texts = generate_texts(tiny_llama, ["rome is", "the city"], seed=1)
    assert case["consistency"] == pytest.approx(
        tfidf_similarity(" ".join(texts), "rome is a city rome rome", snippets.vocab, snippets.idf)
    )
    assert case["fluency"] == pytest.approx(sum(map(ngram_entropy, texts)) / 2)
