"""Propagation loaders (data/propagation.py) and portability metrics (evaluation/portability.py): loader fields
and errors, each metric against values computed by hand on a tiny model, and three real records per set."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, need_shared, tiny
from tiny_models import LLAMA_SIZES, SPECIALS, WORDS

from kvedit.data import DatasetError, EditRequest
from kvedit.data.propagation import (
    PortabilityCase,
    Probe,
    detect_propagation_format,
    load_counterfact_portability,
    load_knowedit,
    load_mquake,
    load_propagation,
    load_zsre_portability,
)
from kvedit.evaluation.generation import generate_texts, ngram_entropy
from kvedit.evaluation.portability import (
    add_relation_locality,
    known_by_accuracy,
    known_by_preference,
    portability_case_metrics,
    portability_fluency,
    relation_locality,
    summarize_portability,
)
from kvedit.models import LM

EDITING = SHARED_DATA / "editing"
SHARED = {
    "counterfact-portability": EDITING / "portability" / "counterfact_portability_gpt4.json",
    "zsre-portability": EDITING / "portability" / "zsre_mend_eval_portability_gpt4.json",
    "knowedit": EDITING / "knowedit" / "benchmark_ZsRE_ZsRE-test-all.json",
    "mquake": EDITING / "mquake" / "MQuAKE-hard.json",
}


def shared_file(fmt: str) -> Path:
    """The shared copy of a set; skipped when absent, a failure when absent under CI."""
    return need_shared(SHARED[fmt])


def tiny_qa_lm(texts: Sequence[str] = (), seed: int = 0) -> LM:
    """The tiny Llama with a word-level vocabulary of `WORDS`, "q", ":", "?" and every word of `texts`, so
    questions, ``Q: … A:`` prompts and real records' answers hold no [UNK] (the scorer drops trailing special
    tokens; a real tokenizer has no unknown words)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = dict.fromkeys([*WORDS, "q", ":", "?", *(w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower()))])
    vocab = {t: i for i, t in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA_SIZES, vocab_size=len(vocab), pad_token_id=0, bos_token_id=5, eos_token_id=6)
    return LM.wrap(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok, name="tiny-qa-llama")


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------- small records of each format

CF_RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} is located in the city of",
        "subject": "the eiffel tower",
        "relation_id": "P131",
        "target_new": {"str": "rome", "id": "Q220"},
        "target_true": {"str": "paris", "id": "Q90"},
    },
    "paraphrase_prompts": ["the eiffel tower stands in"],
    "neighborhood_prompts": ["the louvre is located in"],
    "attribute_prompts": [],
    "generation_prompts": ["the eiffel tower is", "where the eiffel tower stands"],
    "portability": {
        "Recalled Relation": "(rome, capital of, italy)",
        "New Question": "the eiffel tower is located in the capital of",
        "New Answer": "italy",
    },
}
ZSRE_RECORD = {
    "subject": "the louvre",
    "src": "which city is the louvre located in?",
    "pred": "berlin",
    "alt": "madrid",
    "answers": ["paris"],
    "rephrase": "where is the louvre?",
    "loc": "nq question: where is big ben",
    "loc_ans": "london",
    "cond": "berlin >> madrid || which city is the louvre located in?",
    "portability": {
        "Recalled Relation": "(madrid, capital of, spain)",
        "New Question": "the louvre is in the capital of which country?",
        "New Answer": "spain",
    },
}
KNOWEDIT_RECORD = {
    "subject": "big ben",
    "target_new": "berlin",
    "prompt": "which city is big ben located in?",
    "ground_truth": ["london"],
    "rephrase_prompt": "where is big ben?",
    "cond": "x",
    "locality": {
        "Relation_Specificity": [
            {"prompt": "big ben is a famous", "ground_truth": ["landmark"]},
            {"prompt": "big ben landmark", "ground_truth": ["the city of london"]},
        ]
    },
    "portability": {
        "Reasoning": [{"prompt": "big ben is in the capital of", "ground_truth": "germany"}],
        "Subject_Aliasing": [{"prompt": "the landmark big ben is located in", "ground_truth": "berlin"}],
    },
}


def _mquake_record(case_id: int = 1) -> dict:
    def rewrite(prompt, subject, new, true, question):
        return {
            "prompt": prompt,
            "relation_id": "P1",
            "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"},
            "subject": subject,
            "question": question,
        }

    return {
        "case_id": case_id,
        "requested_rewrite": [
            rewrite("{} is located in", "the louvre", "rome", "paris", "where is the louvre?"),
            rewrite("the language of {} is", "rome", "german", "italian", "what language is rome?"),
        ],
        "questions": ["what language is spoken in the city of the louvre?", "the louvre city language?"],
        "answer": "french",
        "answer_alias": ["french language"],
        "new_answer": "german",
        "new_answer_alias": ["deutsch"],
        "single_hops": [
            {
                "question": "where is the louvre?",
                "cloze": "the louvre is located in",
                "answer": "paris",
                "answer_alias": [],
            }
        ],
        "new_single_hops": [
            {
                "question": "where is the louvre?",
                "cloze": "the louvre is located in",
                "answer": "rome",
                "answer_alias": ["roma"],
            }
        ],
        "orig": {},
    }


def test_loaders_map_fields(tmp_path: Path) -> None:
    cf = load_counterfact_portability(_write(tmp_path / "cf.json", [CF_RECORD]))[0]
    assert cf.request.target_new == "rome" and cf.request.target_true == "paris" and cf.case_id == 7
    assert cf.request.generation_prompts == ("the eiffel tower is", "where the eiffel tower stands")
    assert cf.portability == (Probe("one_hop", "the eiffel tower is located in the capital of", ("italy",)),)
    assert cf.recalled_relation == "(rome, capital of, italy)" and cf.true_answers == ("paris",)

    zs = load_zsre_portability(_write(tmp_path / "zs.json", [ZSRE_RECORD]))[0]
    # EasyEdit's zsRE edit: alt is the new answer (the portability question is written around it)
    assert (zs.request.target_new, zs.request.target_true) == ("madrid", "paris")
    assert zs.request.prompt == "which city is {} located in?" and zs.portability[0].answer == "spain"

    ke = load_knowedit(_write(tmp_path / "ke.json", [KNOWEDIT_RECORD]))[0]
    assert ke.request.prompt == "which city is {} located in?" and ke.request.target_true == "london"
    assert [p.kind for p in ke.portability] == ["reasoning", "subject_aliasing"]
    assert ke.locality[1] == Probe("relation_specificity", "big ben landmark", ("the city of london",))

    mq = load_mquake(_write(tmp_path / "mq.json", [_mquake_record()]))[0]
    assert [r.rewrite_prompt for r in mq.requests] == ["the louvre is located in", "the language of rome is"]
    assert mq.requests[1].case_id == "1/1" and mq.edit_questions[1] == "what language is rome?"
    assert mq.edit_answers == (("rome", "roma"), ("german",))  # aliases from the matching new single hop
    assert mq.new_answers == ("german", "deutsch") and mq.answers == ("french", "french language")
    for fmt, record in [
        ("counterfact-portability", CF_RECORD),
        ("zsre-portability", ZSRE_RECORD),
        ("knowedit", KNOWEDIT_RECORD),
        ("mquake", _mquake_record()),
    ]:
        path = _write(tmp_path / f"{fmt}.json", [record])
        assert detect_propagation_format(path) == fmt
        assert type(load_propagation(path)[0]) is type(load_propagation(path, fmt)[0])


def test_loader_errors_name_record_and_field(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(KNOWEDIT_RECORD))
    del bad["portability"]["Reasoning"][0]["ground_truth"]
    with pytest.raises(DatasetError, match=r"record 1: key 'portability\.Reasoning\[0\]\.ground_truth'"):
        load_knowedit(_write(tmp_path / "ke.json", [KNOWEDIT_RECORD, bad]))
    mq = _mquake_record(2)
    del mq["requested_rewrite"][1]["target_new"]
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 2\): requested_rewrite\[1\]: missing key 'target_new'"):
        load_mquake(_write(tmp_path / "mq.json", [_mquake_record(1), mq]))
    with pytest.raises(DatasetError, match=r"record 1 \(case_id 1\): case_id 1 was already used by record 0"):
        load_mquake(_write(tmp_path / "dup.json", [_mquake_record(1), _mquake_record(1)]))
    no_question = json.loads(json.dumps(CF_RECORD)) | {"portability": {"New Answer": "italy"}}
    with pytest.raises(DatasetError, match=r"record 0 \(case_id 7\): missing key 'portability\.New Question'"):
        load_counterfact_portability(_write(tmp_path / "cf.json", [no_question]))
    no_truth = json.loads(json.dumps(CF_RECORD))
    del no_truth["requested_rewrite"]["target_true"]["str"]  # the request part is read by load_counterfact
    with pytest.raises(
        DatasetError, match=r"record 0 \(case_id 7\): missing key 'requested_rewrite\.target_true\.str'"
    ):
        load_counterfact_portability(_write(tmp_path / "cf2.json", [no_truth]))
    with pytest.raises(DatasetError, match="cannot tell the propagation format"):
        load_propagation(_write(tmp_path / "x.json", [{"a": 1}]))
    with pytest.raises(DatasetError, match="unknown format 'cf'"):
        load_propagation(tmp_path / "x.json", "cf")
    # a prompt without its subject cannot be a locate-then-edit request: an error, or skipped on request
    unedited = KNOWEDIT_RECORD | {"prompt": "which city is it located in?"}
    path = _write(tmp_path / "skip.json", [KNOWEDIT_RECORD, unedited])
    with pytest.raises(DatasetError, match=r"record 1: invalid edit request: subject 'big ben' does not occur"):
        load_knowedit(path)
    with pytest.warns(UserWarning, match="skipped 1 record"):
        assert len(load_knowedit(path, skip_invalid=True)) == 1


# ---------------------------------------------------------------- metrics by hand on a tiny model


def _hand_accuracy(lm, prompt: str, answer: str) -> tuple[float, list[int]]:
    """EasyEdit's token accuracy written out: forward prompt + " " + answer, compare the argmax at each answer
    position with the next true token. Returns (accuracy, argmax ids along the answer)."""
    tok = lm.tokenizer
    n_prompt = len(tok(prompt)["input_ids"])
    ids = tok(prompt + " " + answer)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0]
    predicted = [int(logits[n_prompt - 1 + j].argmax()) for j in range(len(ids) - n_prompt)]
    hits = [p == t for p, t in zip(predicted, ids[n_prompt:])]
    return sum(hits) / len(hits), predicted


def _hand_nll(lm, prompt: str, answer: str) -> float:
    tok = lm.tokenizer
    n_prompt = len(tok(prompt)["input_ids"])
    ids = tok(prompt + " " + answer)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    return -sum(float(logp[n_prompt - 1 + j, ids[n_prompt + j]]) for j in range(len(ids) - n_prompt)) / (
        len(ids) - n_prompt
    )


def _case() -> PortabilityCase:
    request = EditRequest(
        prompt="{} is located in the city of",
        subject="the colosseum",
        target_new="paris",
        target_true="rome",
        case_id="c",
    )
    portability = (
        Probe("reasoning", "the colosseum is located in the capital of", ("france",)),
        Probe("reasoning", "the colosseum stands in a city where people speak", ("french and english",)),
        Probe("subject_aliasing", "the famous landmark of rome is located in", ("paris",)),
    )
    locality = (
        Probe("relation_specificity", "the colosseum is a famous", ("landmark",)),
        Probe("relation_specificity", "the colosseum was", ("a famous landmark of italy",)),
    )
    return PortabilityCase(request, portability, locality, true_answers=("rome",))


def test_portability_metrics_match_hand_computation() -> None:
    lm, case = tiny("llama"), _case()
    got = portability_case_metrics(lm, [case, PortabilityCase(case.request, ())])
    hand = {p: _hand_accuracy(lm, p.prompt, p.answer) for p in (*case.portability, *case.locality)}
    reasoning = [hand[p][0] for p in case.portability[:2]]
    assert got[0]["reasoning_accuracy"] == pytest.approx(sum(reasoning) / 2)
    assert got[0]["subject_aliasing_accuracy"] == pytest.approx(hand[case.portability[2]][0])
    assert got[0]["portability_accuracy"] == pytest.approx((sum(reasoning) + hand[case.portability[2]][0]) / 3)
    assert got[0]["relation_specificity_accuracy"] == pytest.approx(sum(hand[p][0] for p in case.locality) / 2)
    assert got[0]["relation_specificity_argmax"] == [hand[p][1] for p in case.locality]
    assert "one_hop_accuracy" not in got[0] and got[1] == {"case_id": "c"}  # absent, never 0

    # EasyEdit's locality: the fraction of answer positions whose argmax a different ("edited") model keeps
    edited = tiny("llama", seed=1)
    post = portability_case_metrics(edited, [case])[0]
    fractions = []
    for probe in case.locality:
        after, before = _hand_accuracy(edited, probe.prompt, probe.answer)[1], hand[probe][1]
        fractions.append(sum(a == b for a, b in zip(after, before)) / len(before))
    assert relation_locality(post, got[0]) == pytest.approx(sum(fractions) / 2)
    assert relation_locality(got[0], got[0]) == 1.0
    add_relation_locality([post], {"c": got[0]["relation_specificity_argmax"]})
    assert post["relation_specificity_unchanged"] == pytest.approx(sum(fractions) / 2)


def test_summary_and_known_rules() -> None:
    summary = summarize_portability(
        [
            {"portability_accuracy": 0.5, "one_hop_accuracy": 0.5},
            {"portability_accuracy": 1.0, "relation_specificity_unchanged": 0.25},
        ]
    )
    assert summary["n"] == 2 and summary["portability_accuracy"] == pytest.approx(75.0)
    assert summary["one_hop_accuracy"] == pytest.approx(50.0) and summary["n_one_hop_accuracy"] == 1
    assert summary["relation_specificity_unchanged"] == pytest.approx(25.0) and summary["reasoning_accuracy"] is None

    lm = tiny("llama")
    cases = [
        _case(),
        PortabilityCase(
            EditRequest(prompt="{} is located in", subject="big ben", target_new="rome", target_true="london"), ()
        ),
        PortabilityCase(EditRequest(prompt="{} is located in", subject="big ben", target_new="rome"), ()),
    ]
    expected = [
        _hand_nll(lm, c.request.rewrite_prompt, c.request.target_true)
        < _hand_nll(lm, c.request.rewrite_prompt, c.request.target_new)
        for c in cases[:2]
    ]
    assert known_by_preference(lm, cases) == expected + [False]  # no target_true: nothing to change
    accuracy = [_hand_accuracy(lm, c.request.rewrite_prompt, c.request.target_true)[0] for c in cases[:2]]
    assert known_by_accuracy(lm, cases) == [a == 1.0 for a in accuracy] + [False]
    assert known_by_accuracy(lm, cases, threshold=0.01) == [a > 0 for a in accuracy] + [False]


def test_fluency_on_generation_prompts() -> None:
    lm = tiny("llama")
    request = EditRequest(
        prompt="{} is located in the city of",
        subject="the louvre",
        target_new="rome",
        target_true="paris",
        generation_prompts=("the louvre is", "the louvre stands in"),
    )
    out = portability_fluency(lm, [PortabilityCase(request, ()), _case()], seed=3)
    texts = generate_texts(lm, request.generation_prompts, seed=3)
    assert out[0]["fluency"] == pytest.approx(sum(map(ngram_entropy, texts)) / 2)
    assert out[0]["generation_seed"] == 3 and out[1] == {}  # no generation prompts: absent


# ---------------------------------------------------------------- three real records per set


@pytest.mark.parametrize("fmt", ["counterfact-portability", "zsre-portability", "knowedit"])
def test_real_records_load_and_score(fmt: str) -> None:
    cases = load_propagation(shared_file(fmt), limit=3)
    assert len(cases) == 3 and detect_propagation_format(SHARED[fmt]) == fmt
    first = cases[0]
    if fmt == "counterfact-portability":
        assert (first.case_id, first.request.target_new, first.request.target_true) == (4482, "Philadelphia", "London")
        assert first.portability[0].answer == "Cheesesteaks" and len(first.request.generation_prompts) == 10
    elif fmt == "zsre-portability":
        assert (first.request.target_new, first.request.target_true) == ("2006", "1998")
        assert first.portability[0].prompt.endswith("which was established in 2006?")
    else:
        assert (first.request.subject, first.request.target_new, first.request.target_true) == (
            "Epaspidoceras",
            "Noctuidae",
            "Aspidoceratidae",
        )
        assert [p.kind for p in first.portability] == ["reasoning"] and len(first.locality) == 2
    lm = tiny_qa_lm([t for c in cases for p in (*c.portability, *c.locality) for t in (p.prompt, p.answer)])
    assert lm.tokenizer.unk_token_id not in lm.tokenizer(first.portability[0].prompt)["input_ids"]
    got = portability_case_metrics(lm, cases)
    for case, metrics in zip(cases, got):
        values = [_hand_accuracy(lm, p.prompt, p.answer)[0] for p in case.portability]
        assert metrics["portability_accuracy"] == pytest.approx(sum(values) / len(values))
        if case.locality:
            loc = [_hand_accuracy(lm, p.prompt, p.answer)[0] for p in case.locality]
            assert metrics["relation_specificity_accuracy"] == pytest.approx(sum(loc) / len(loc))


def test_real_knowedit_and_zsre_need_skip_invalid() -> None:
    """The official files hold records no EditRequest can be (a prompt that states the answer, or lacks the
    subject): the loader says which, and skip_invalid leaves them out."""
    with pytest.raises(DatasetError, match=r"record 163: invalid edit request"):
        load_knowedit(shared_file("knowedit"))
    with pytest.warns(UserWarning, match="skipped 4 record"):
        assert len(load_knowedit(SHARED["knowedit"], skip_invalid=True)) == 1300
