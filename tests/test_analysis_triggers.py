"""Trigger mining: the streaming top-k equals a brute-force top-k over every prefix, for every family."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from kvedit.analysis import corpus
from kvedit.analysis.runs import analyze_triggers, triggers_in
from kvedit.analysis.topk import order_key
from kvedit.analysis.triggers import RunningTopK, TriggerSet, load_or_mine, mine_triggers
from kvedit.models import ARCHITECTURES, Trace

TEXT = (
    "the eiffel tower is located in paris. the colosseum is in rome! berlin is the capital of germany.\n"
    "= the heading =\n\n"
    "madrid is the capital of spain. the louvre is a famous landmark in paris. it was born in london.\n"
    "french is spoken in france. italian is the language of italy. the big ben stands in london.\n"
    "german is the official language of germany. english is spoken in london and paris.\n"
)
#: the text of the `corpus_file` fixture (conftest)
CORPUS_TEXT = TEXT


def brute_force(lm, source, layers, max_tokens, stride):
    """Every counted prefix of every sentence, each sentence run alone (no padding): ({layer: [N, d_ff]}, codes [N])."""
    special = set(lm.tokenizer.all_special_ids)
    coeffs, codes = {l: [] for l in layers}, []
    for batch, ids_list in corpus.token_batches(lm, source, max_tokens, batch_size=3):
        for seq, ids in zip(batch.sequence_ids.tolist(), ids_list):
            with torch.no_grad(), Trace(lm, read=[("coefficients", l) for l in layers]) as tr:
                lm.model(input_ids=torch.tensor([ids]))
            keep = [p for p, t in enumerate(ids) if t not in special]
            for l in layers:
                coeffs[l].append(tr["coefficients", l][0, keep].float())
            codes += [seq * stride + p for p in keep]
    return {l: torch.cat(c) for l, c in coeffs.items()}, torch.tensor(codes)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_streaming_topk_equals_brute_force(family, corpus_file):
    lm = tiny(family)
    found = mine_triggers(lm, str(corpus_file), k=4, max_tokens=10_000, batch_size=2, progress=False)
    assert found.layers == list(range(lm.num_layers))
    full, codes = brute_force(lm, str(corpus_file), found.layers, 10_000, found.stride)
    assert found.meta["tokens"] == len(codes)
    row_of = {c: i for i, c in enumerate(codes.tolist())}
    for layer in found.layers:
        top = full[layer].topk(4, dim=0)  # [k, d_ff]
        torch.testing.assert_close(found.coefficients[layer], top.values.T, rtol=1e-4, atol=1e-5)
        # each kept prefix really has that coefficient (equal first tokens tie exactly, so compare values)
        rows = torch.tensor([[row_of[c] for c in r] for r in found.codes[layer].tolist()])  # [d_ff, k]
        at_codes = full[layer].gather(0, rows.T).T
        torch.testing.assert_close(at_codes, found.coefficients[layer], rtol=1e-4, atol=1e-5)


def test_rank_by_absolute_value_keeps_the_sign(corpus_file):
    lm = tiny("llama")
    found = mine_triggers(lm, str(corpus_file), layers=[2], k=3, max_tokens=10_000, rank="abs", progress=False)
    full, codes = brute_force(lm, str(corpus_file), [2], 10_000, found.stride)
    idx = full[2].abs().topk(3, dim=0).indices  # [k, d_ff]
    torch.testing.assert_close(found.coefficients[2], full[2].gather(0, idx).T, rtol=1e-4, atol=1e-5)
    assert (found.coefficients[2] < 0).any()  # gated FFNs write with negative coefficients too


def test_running_topk_merges_chunks_like_one_topk():
    torch.manual_seed(0)
    scores = torch.randn(500, 7)
    top = RunningTopK.empty(7, 5, torch.device("cpu"))
    for start in range(0, 500, 64):
        top.update(scores[start : start + 64], torch.arange(start, min(start + 64, 500)))
    expect = scores.topk(5, dim=0)
    assert torch.equal(top.coefficients, expect.values.T)
    assert torch.equal(top.codes, expect.indices.T)


@pytest.mark.parametrize("rank", ["value", "abs"])
def test_running_topk_breaks_ties_towards_the_earlier_place_whatever_the_batching(rank):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (400, 6), generator=g).float()  # seven values: ties everywhere
    valid = torch.rand(400, generator=g) > 0.2
    key = scores if rank == "value" else scores.abs()
    places = [i for i in range(400) if valid[i]]
    expect = torch.tensor([sorted(places, key=lambda i: (-key[i, j].item(), i))[:5] for j in range(6)])  # [d, k]
    for size, shuffled in ((400, False), (7, False), (7, True), (64, True)):
        starts = list(range(0, 400, size))
        if shuffled:
            starts = [starts[i] for i in torch.randperm(len(starts), generator=g).tolist()]
        top = RunningTopK.empty(6, 5, torch.device("cpu"))
        for start in starts:
            rows = slice(start, start + size)
            top.update(scores[rows], torch.arange(400)[rows], rank, valid[rows])
        assert torch.equal(top.codes, expect), (size, shuffled)
        assert torch.equal(top.coefficients, scores.gather(0, expect.T).T)  # signed, even when ranked by |m|
    with pytest.raises(ValueError, match=r"coefficients \[N, 6\]"):
        top.update(scores[:, :5], torch.arange(400))
    with pytest.raises(ValueError, match="codes must lie in"):
        top.update(scores[:2], torch.tensor([0, 2**32 - 1]))


def test_order_key_orders_by_score_then_earlier_code():
    scores = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, 7.25, float("inf")])
    codes = torch.tensor([-1, 9, 4, 8, 3, 2**32 - 2, 6, 1, 0, 5])
    ranked = sorted(range(10), key=lambda i: (scores[i].item(), -codes[i].item()))
    assert order_key(scores, codes).argsort().tolist() == ranked


def test_examples_point_at_the_right_tokens_and_survive_a_round_trip(corpus_file, tmp_path):
    lm = tiny("gpt2")
    found = mine_triggers(lm, str(corpus_file), layers=[1, 3], k=3, max_tokens=10_000, progress=False)
    found.save(tmp_path / "mined")
    again = TriggerSet.load(tmp_path / "mined")
    assert again.layers == [1, 3] and again.meta == found.meta | {"layers": [1, 3], "stride": found.stride}
    for key in (0, 17, 63):
        for ex in again.examples(3, key):
            ids = found.sequences[ex.sequence]
            assert ex.ids == ids[: ex.position + 1]
            assert ex.next_id == (ids[ex.position + 1] if ex.position + 1 < len(ids) else None)
    assert torch.equal(again.token_table(3, 1)[17, 0], torch.tensor(again.examples(3, 17)[0].next_id or -1))
    with pytest.raises(ValueError, match="was not mined"):
        again.examples(0, 1)
    with pytest.raises(ValueError, match="out of range"):
        again.examples(1, 64)


def test_a_mined_folder_is_reused_and_refused_for_another_model(corpus_file, tmp_path, monkeypatch):
    lm = tiny("llama")
    first = load_or_mine(tmp_path, lm, source=str(corpus_file), k=2, max_tokens=500, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("mined again")

    monkeypatch.setattr("kvedit.analysis.triggers.mine_triggers", fail)
    again = load_or_mine(tmp_path, lm, layers=[0, 1], source=str(corpus_file))
    assert torch.equal(again.codes[1], first.codes[1])
    with pytest.raises(ValueError, match="mined on 'tiny-llama'"):
        triggers_in(tmp_path, tiny("llama", seed=1))


def test_analyze_triggers_writes_jsonl_and_pages_and_refuses_other_settings(corpus_file, tmp_path):
    lm = tiny("opt")
    done = analyze_triggers(lm, tmp_path, str(corpus_file), keys=[(2, 5)], k=3, tokens=10_000, progress=False)
    assert not done["reused"]
    lines = (tmp_path / "triggers" / "layer-02.jsonl").read_text().splitlines()
    assert len(lines) == 64
    page = (tmp_path / "keys" / "L2-K5.md").read_text()
    first = TriggerSet.load(tmp_path).examples(2, 5)[0]
    assert f"{first.coefficient:.3f}" in page and "**" in page and "Value tokens (+v)" in page
    assert analyze_triggers(lm, tmp_path, str(corpus_file), keys=[(2, 5)], k=3, tokens=10_000, progress=False)["reused"]
    with pytest.raises(ValueError, match="already holds triggers"):
        analyze_triggers(lm, tmp_path, str(corpus_file), k=5, tokens=10_000, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        analyze_triggers(lm, tmp_path, str(corpus_file), keys=[(2, 64)], k=3, tokens=10_000, progress=False)


def test_corpus_skips_headings_splits_sentences_and_stops_at_the_token_budget(corpus_file):
    lm = tiny("llama")
    assert corpus.sentences("It rained. Then it stopped! Ok") == ["It rained.", "Then it stopped!"]
    batches = list(corpus.token_batches(lm, str(corpus_file), max_tokens=20, batch_size=4))
    assert sum(b.num_tokens for b, _ in batches) == 20
    texts = [lm.tokenizer.decode(ids) for _, ids_list in batches for ids in ids_list]
    assert not any("heading" in t for t in texts)
    with pytest.raises(ValueError, match="max_tokens"):
        next(corpus.token_batches(lm, str(corpus_file), max_tokens=0))
