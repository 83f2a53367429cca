"""Value projection, logit lens, agreement, active memories and composition against hand-computed answers."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from kvedit.analysis.layers import agreement, corpus_statistics
from kvedit.analysis.runs import analyze_layers, analyze_values
from kvedit.analysis.triggers import TriggerSet
from kvedit.analysis.values import value_projection, value_projections
from kvedit.analysis.vocab import logit_lens
from kvedit.models import ARCHITECTURES, Trace, ffn_memory

TEXT = "the eiffel tower is located in paris. berlin is the capital of germany. french is spoken in france.\n"
#: the text of the `corpus_file` fixture (conftest)
CORPUS_TEXT = TEXT * 3


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_value_projection_is_E_times_v(family):
    lm = tiny(family)
    E = lm.module(lm.arch.unembed).weight.detach()
    memory = ffn_memory(lm, 2)
    values = memory.written.detach()  # v_i itself, or g ⊙ v_i behind a post-FFN norm with gain g
    if lm.arch.post_ffn_norm is None:
        assert torch.equal(values, memory.values)
    else:
        torch.testing.assert_close(values, memory.values * memory.post_norm_gain)
    proj = value_projection(lm, 2, k=3)
    expect = (values @ E.T).topk(3, dim=-1)
    assert torch.equal(proj.top_ids, expect.indices)
    torch.testing.assert_close(proj.top_logits, expect.values)
    assert torch.equal(proj.bottom_ids, (-values @ E.T).topk(3, dim=-1).indices)
    normed = value_projection(lm, 2, k=3, apply_final_norm=True)
    with torch.no_grad():
        by_hand = lm.module(lm.arch.final_norm)(values) @ E.T
    assert normed.final_norm and torch.equal(normed.top_ids, by_hand.topk(3, dim=-1).indices)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_logit_lens_at_the_last_layer_is_the_models_output(family):
    lm = tiny(family)
    enc = lm.tokenizer(["the eiffel tower is in paris", "berlin is"], return_tensors="pt", padding=True)
    with torch.no_grad(), Trace(lm, read=[("residual", -1)]) as tr:
        logits = lm.model(**enc).logits
    torch.testing.assert_close(logit_lens(lm, tr["residual", -1]), logits, rtol=1e-4, atol=1e-4)


def one_hot_unembedding(lm):
    """E[t] = e_t for t < d_model, 0 beyond: then E·x reads x's coordinates as token scores."""
    E = lm.module(lm.arch.unembed).weight
    with torch.no_grad():
        E.zero_()
        E[: lm.d_model] = torch.eye(lm.d_model)


def test_agreement_counts_the_values_whose_top_token_follows_the_top_trigger():
    lm = tiny("gpt2")
    one_hot_unembedding(lm)
    mem = ffn_memory(lm, 1)
    d_ff, d = mem.d_ff, lm.d_model
    with torch.no_grad():
        mem.values.zero_()
        mem.values[torch.arange(d_ff), torch.arange(d_ff) % d] = 1.0  # value i promotes token i % d
    # memory i's top trigger example is sequence i, position 0; it is followed by token i % d for i < 16
    sequences = {i: (40, i % d if i < 16 else (i + 1) % d) for i in range(d_ff)}
    codes = torch.arange(d_ff)[:, None] * 8
    triggers = TriggerSet([1], {1: torch.ones(d_ff, 1)}, {1: codes}, sequences, stride=8)
    proj = value_projections(lm, [1], k=1, progress=False)
    assert torch.equal(proj[1].top_ids[:, 0], torch.arange(d_ff) % d)
    found = agreement(triggers, proj, shuffles=20)[1]
    assert found["agreement"] == 16 / d_ff
    assert found["agreement_shuffled"] < 0.1
    assert found["shallow"] == 1.0  # one example per key: its trigger token is its most common one


def set_constant_coefficients(lm, layer, biases, values):
    """Key weights 0 and key bias `biases` (`[d_ff]`), so every token gets coefficient act(bias); values as given."""
    key = lm.module(next(iter(lm.key_paths(layer).values())))
    out = lm.module(lm.values_path(layer))
    with torch.no_grad():
        key.weight.zero_()
        key.bias.copy_(biases)
        ffn_memory(lm, layer).values.copy_(values)
        out.bias.zero_()


@pytest.mark.parametrize("shared_top", [False, True])
def test_composition_and_active_memories_on_hand_set_weights(corpus_file, shared_top):
    lm = tiny("gpt2")  # GELU: active means |m|·‖v‖ ≥ 0.1 × the token's largest
    one_hot_unembedding(lm)
    d_ff, d = 64, lm.d_model
    biases = torch.full((d_ff,), -12.0)
    biases[:2] = 3.0
    values = torch.zeros(d_ff, d)
    values[0, 5], values[0, 9] = 1.0, 0.9  # memory 0 alone promotes token 5
    values[1, 7 if not shared_top else 5], values[1, 9] = 1.0, 0.9  # memory 1 alone promotes token 7 (or 5)
    values[2:, 1] = 1.0  # switched off (coefficient ≈ 0) but with nonzero norm
    set_constant_coefficients(lm, 2, biases, values)
    proj = value_projections(lm, progress=False)
    stats = corpus_statistics(lm, str(corpus_file), proj, max_tokens=40, progress=False)
    assert stats[2]["tokens"] == 40
    assert stats[2]["active_mean"] == 2.0
    # together: token 9 scores 1.8 against 1 for tokens 5 and 7, so the layer predicts what neither memory does
    assert stats[2]["composition"] == (0.0 if shared_top else 1.0)
    assert stats[-1 % lm.num_layers]["lens_top_is_final"] == 1.0


def test_relu_memories_are_active_exactly_when_positive(corpus_file):
    lm = tiny("opt")
    biases = torch.linspace(-1, 1, 64)  # 32 positive
    set_constant_coefficients(lm, 1, biases, torch.randn(64, lm.d_model))
    stats = corpus_statistics(
        lm, str(corpus_file), value_projections(lm, [1], progress=False), max_tokens=30, progress=False
    )
    assert stats[1]["active_mean"] == 32.0


def test_analyze_layers_and_values_write_tables_and_plots(corpus_file, tmp_path):
    lm = tiny("llama")
    done = analyze_layers(lm, tmp_path, str(corpus_file), tokens=30, progress=False)
    names = {p.name for p in done["files"]}
    assert {
        "layers.jsonl",
        "layers.csv",
        "layers.md",
        "analysis-active.png",
        "analysis-composition.png",
        "analysis-refinement.png",
        "analysis-ffn-changes.png",
    } <= names
    assert "agreement" not in done["stats"][0]  # no mined triggers in this folder
    assert done["stats"][3]["lens_top_is_final"] == 1.0
    assert (tmp_path / "layers.csv").read_text().count("\n") == lm.num_layers + 1
    analyze_values(lm, tmp_path, layers=[1], keys=[(1, 4)], k=4, progress=False)
    line = (tmp_path / "values" / "layer-01.jsonl").read_text().splitlines()[4]
    assert '"key": 4' in line and '"final_norm": false' in line
    assert "| 1 | 4 |" in (tmp_path / "values.md").read_text()
