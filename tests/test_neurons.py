"""Knowledge neurons: integrated gradients against a direct computation and the integral they approximate,
the reference's selection rule, and suppression."""

from __future__ import annotations

import pytest
import torch

from kvedit.analysis.neurons import (
    answer_probability,
    attributions,
    coarse_neurons,
    fact_neurons,
    suppression_effect,
)
from helpers import tiny

PROMPT = "the eiffel tower is located in the city of"


def _probability_with(lm, layer, coefficients_at_last):
    """P(first token of ' paris') with layer `layer`'s coefficients at the last token set, via a plain hook on
    the full model (no replayed layers, no Trace)."""
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    target = lm.tokenizer(" paris", add_special_tokens=False)["input_ids"][0]
    values = lm.module(lm.values_path(layer))

    def put(module, args):
        h = args[0].clone()
        h.view(-1, h.shape[-1])[-1] = coefficients_at_last  # the last row is the last token (OPT flattens to 2-D)
        return (h, *args[1:])

    handle = values.register_forward_pre_hook(put)
    try:
        return lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)[target]
    finally:
        handle.remove()


def _direct_riemann_sum(lm, layer, steps):
    """m̄ · (1/steps) Σ_k ∂P/∂m at (k/steps)·m̄, each gradient from a full forward pass with a plain hook."""
    captured = {}
    handle = lm.module(lm.values_path(layer)).register_forward_pre_hook(
        lambda m, a: captured.setdefault("m", a[0].reshape(-1, a[0].shape[-1])[-1].detach().clone())
    )
    with torch.no_grad():
        lm.model(input_ids=lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    handle.remove()
    m_bar = captured["m"]
    grads = []
    for k in range(steps):
        point = (k / steps * m_bar).requires_grad_(True)
        (g,) = torch.autograd.grad(_probability_with(lm, layer, point), point)
        grads.append(g)
    return m_bar * torch.stack(grads).sum(0) / steps


@pytest.mark.parametrize("family", ["gpt_neox", "opt", "gptj", "olmo2", "qwen2", "gemma2"])
def test_attributions_run_the_last_token_alone_on_every_family(family):
    """The earlier tokens come from the prompt's KV cache and only the last one runs per step: the first and the
    last layer (no replayed layers; replay up to the top) equal the direct sum on the families not tested below."""
    lm = tiny(family)
    for layer in (0, lm.num_layers - 1):
        got = attributions(lm, PROMPT, "paris", steps=4, layers=[layer])[0]
        torch.testing.assert_close(got, _direct_riemann_sum(lm, layer, 4), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_attributions_equal_a_direct_riemann_sum_and_approach_the_integral(family):
    lm = tiny(family)
    layer = 1
    got = attributions(lm, PROMPT, "paris", steps=8, layers=[layer])[0]
    torch.testing.assert_close(got, _direct_riemann_sum(lm, layer, 8), atol=1e-7, rtol=1e-4)  # α = k/8, k = 0…7
    captured = {}
    handle = lm.module(lm.values_path(layer)).register_forward_pre_hook(
        lambda m, a: captured.setdefault("m", a[0][0, -1].detach().clone())
    )
    with torch.no_grad():
        lm.model(input_ids=lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"])
    handle.remove()
    m_bar = captured["m"]
    # completeness: with a fine grid the attributions add up to P(m̄) − P(0)
    fine = attributions(lm, PROMPT, "paris", steps=400, layers=[layer])[0]
    with torch.no_grad():
        gap = float(_probability_with(lm, layer, m_bar) - _probability_with(lm, layer, torch.zeros_like(m_bar)))
    assert float(fine.sum()) == pytest.approx(gap, rel=0.02, abs=1e-7)


def test_coarse_and_refined_selection_follow_the_reference_rule(monkeypatch):
    scores = torch.tensor([[0.1, 0.5, -2.0], [0.19, 0.2, 1.0]])
    assert coarse_neurons(scores, [3, 7]) == [(3, 1), (7, 1), (7, 2)]  # ≥ 0.2 × 1.0, over all layers
    assert coarse_neurons(-scores.abs(), [3, 7]) == []
    import kvedit.analysis.neurons as neurons

    per_prompt = {"a": [[0.0, 1.0], [0.5, 0.0]], "b": [[0.0, 1.0], [0.0, 0.0]], "c": [[0.3, 1.0], [0.0, 0.9]]}
    monkeypatch.setattr(
        neurons, "attributions", lambda lm, p, a, steps, layers, on_layer=None: torch.tensor(per_prompt[p])
    )

    class Two:
        num_layers = 2

    fact = fact_neurons(Two(), ["a", "b", "c"], "x")
    # three prompts: a neuron must be coarse in all three (max(0.7·3, min(3, 3)) = 3)
    assert [(l, i) for l, i, _ in fact.neurons] == [(0, 1)]
    assert fact.neurons[0][2] == pytest.approx(1.0)
    two = fact_neurons(Two(), ["a", "c"], "x")  # two prompts: in both (max(1.4, 2))
    assert sorted((l, i) for l, i, _ in two.neurons) == [(0, 1)]
    one = fact_neurons(Two(), ["c"], "x")  # one prompt: every coarse neuron (EasyEdit's single-prompt case)
    assert sorted((l, i) for l, i, _ in one.neurons) == [(0, 0), (0, 1), (1, 1)]


def test_suppressing_a_facts_neurons_sets_their_coefficients_to_zero():
    lm = tiny("llama")
    fact = fact_neurons(lm, [PROMPT, "the eiffel tower lies in the city of"], "paris", steps=4)
    assert fact.neurons and all(0 <= l < lm.num_layers for l, _, _ in fact.neurons)
    own = [(l, i) for l, i, _ in fact.neurons]
    layer, memory = own[0]
    handle = lm.module(lm.values_path(layer)).register_forward_pre_hook(
        lambda mod, a: (torch.cat([a[0][:, :-1], a[0][:, -1:].index_fill(-1, torch.tensor([memory]), 0.0)], 1),)
    )
    with torch.no_grad():
        ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        target = lm.tokenizer(" paris", add_special_tokens=False)["input_ids"][0]
        want = lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)[target]
    handle.remove()
    assert answer_probability(lm, PROMPT, "paris", [(layer, memory)]) == pytest.approx(float(want), rel=1e-5)
    effect = suppression_effect(lm, fact)
    assert set(effect) == {"knowledge", "random"}


def test_analyze_neurons_end_to_end_and_resume(capsys, tiny_folder, tmp_path):
    import json

    from kvedit.cli import main

    facts = [
        {
            "case_id": i,
            "prompt": p,
            "subject": s,
            "target_new": "london",
            "target_true": t,
            "paraphrase_prompts": [f"{s} lies in"],
        }
        for i, (p, s, t) in enumerate(
            [
                ("{} is located in the city of", "the eiffel tower", "paris"),
                ("{} is the capital of", "berlin", "germany"),
                ("the official language of {} is", "france", "french"),
            ]
        )
    ]
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(facts))
    out = tmp_path / "kn"
    argv = [
        "analyze",
        "neurons",
        "--dataset",
        str(data),
        "--model",
        str(tiny_folder),
        "--all-facts",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    records = [json.loads(x) for x in (out / "neurons.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in records] == [0, 1] and all(len(r["prompts"]) == 2 for r in records)
    summary = json.loads((out / "neurons.json").read_text())
    assert summary["facts"] == 2 and sum(summary["layers"].values()) == sum(len(r["neurons"]) for r in records)
    assert "knowledge neurons" in text and (out / "neuron_layers.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0  # resumed: nothing recomputed
    assert len((out / "neurons.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    other_steps = [x if x != "2" or argv[i - 1] != "--steps" else "3" for i, x in enumerate(argv)]
    assert main(other_steps) == 2
    assert "other settings" in capsys.readouterr().err
