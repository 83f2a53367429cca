"""The KN editor (EasyEdit's): the value rows of the true object's knowledge neurons move by the embedding
difference, and nothing else changes; every family; the command line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import snapshot, tiny

import kvedit
from kvedit.analysis.neurons import attributions, coarse_neurons
from kvedit.cli import main
from kvedit.models.architectures import ARCHITECTURES

REQUEST = kvedit.EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")


def test_the_value_rows_of_the_neurons_move_by_the_embedding_difference():
    lm = tiny("llama")
    before = snapshot(lm)
    layers = list(range(lm.num_layers))
    scores = attributions(lm, REQUEST.rewrite_prompt, "paris", 20, layers)
    neurons = coarse_neurons(scores, layers, 0.2)
    ids = lm.tokenizer(REQUEST.rewrite_prompt, return_tensors="pt")["input_ids"]
    greedy = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    new = lm.tokenizer(" rome", add_special_tokens=False)["input_ids"]
    embed = lm.model.get_input_embeddings().weight.detach()
    shift = 2 * (embed[new[0]] - embed[greedy])
    delta = kvedit.edit(lm, REQUEST, "kn", preset="gpt2-xl")  # 20 steps, threshold 0.2
    after = snapshot(lm)
    assert [(l, i) for l, i, _ in delta.records.neurons[0]] and sorted(
        (l, i) for l, i, _ in delta.records.neurons[0]
    ) == sorted(neurons)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if not any(name == f"{lm.values_path(l)}.weight" for l, _ in neurons):
            assert not changed, name
    for layer, memory in neurons:
        name = f"{lm.values_path(layer)}.weight"
        torch.testing.assert_close(after[name][:, memory], before[name][:, memory] + shift)
        others = [c for c in range(after[name].shape[1]) if (layer, c) not in neurons]
        assert torch.equal(after[name][:, others], before[name][:, others])
    delta.revert(lm)
    assert all(torch.equal(snapshot(lm)[n], before[n]) for n in before)


def test_without_a_true_object_the_neurons_are_those_of_the_models_own_answer():
    """zsRE as MEMIT loads it has no true object: KN attributes the model's own next token (token id, not text)."""
    lm = tiny("llama")
    request = kvedit.EditRequest(REQUEST.prompt, REQUEST.subject, target_new="rome")
    ids = lm.tokenizer(request.rewrite_prompt, return_tensors="pt")["input_ids"]
    greedy = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    layers = list(range(lm.num_layers))
    expected = sorted(coarse_neurons(attributions(lm, request.rewrite_prompt, greedy, 20, layers), layers, 0.2))
    before = snapshot(lm)
    delta = kvedit.edit(lm, request, "kn", preset="gpt2-xl")
    assert expected and sorted((l, i) for l, i, _ in delta.records.neurons[0]) == expected
    delta.revert(lm)
    assert all(torch.equal(snapshot(lm)[n], before[n]) for n in before)


def test_a_multi_token_new_object_adds_each_token_once():
    lm = tiny("llama")
    request = kvedit.EditRequest(REQUEST.prompt, REQUEST.subject, target_new="big ben", target_true="paris")
    new = lm.tokenizer(" big ben", add_special_tokens=False)["input_ids"]
    assert len(new) == 2 and len(set(new)) == 2 and lm.tokenizer.unk_token_id not in new
    ids = lm.tokenizer(request.rewrite_prompt, return_tensors="pt")["input_ids"]
    greedy = []
    with torch.no_grad():  # the model's own two next tokens
        for _ in new:
            greedy.append(int(lm.model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], 1)
    embed = lm.model.get_input_embeddings().weight.detach().clone()
    before = snapshot(lm)
    delta = kvedit.edit(lm, request, "kn", preset="gpt2-xl")
    layer, memory, _ = delta.records.neurons[0][0]
    name = f"{lm.values_path(layer)}.weight"
    shift = embed[new].sum(0) - embed[greedy].sum(0)  # coefficient 1 for each token, not 2
    torch.testing.assert_close(snapshot(lm)[name][:, memory], before[name][:, memory] + shift)


@pytest.mark.parametrize("family", [f for f, a in ARCHITECTURES.items() if a.objective == "causal"])
def test_kn_edits_every_causal_family_and_reverts_bit_exactly(family):
    lm = tiny(family)
    before = snapshot(lm)
    delta = kvedit.edit(lm, REQUEST, "kn", preset="gpt2-xl")
    assert delta.metadata["method"] == "kn" and delta.records.neurons[0]
    values = {f"{lm.values_path(l)}.weight" for l in range(lm.num_layers)}
    assert all(n in values for n in delta.names)
    delta.revert(lm)
    assert all(torch.equal(snapshot(lm)[n], before[n]) for n in before)


def test_kn_on_a_masked_lm_is_refused():
    with pytest.raises(ValueError, match="masked"):
        kvedit.edit(tiny("bert"), REQUEST, "kn")


def test_kvedit_edit_method_kn(capsys, tiny_folder, tmp_path):
    patch = tmp_path / "kn.safetensors"
    assert (
        main(
            [
                "edit",
                "--method",
                "kn",
                "--prompt",
                REQUEST.prompt,
                "--subject",
                REQUEST.subject,
                "--new",
                "rome",
                "--true",
                "paris",
                "--preset",
                "gpt2-xl",
                "--model",
                str(tiny_folder),
                "--save",
                str(patch),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "kn" and patch.is_file()


def test_a_threshold_sweep_inside_reused_attributions_integrates_once_with_the_same_updates(monkeypatch):
    from kvedit.editing import kn

    lm = tiny("llama")
    other = kvedit.EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany")

    def updates(request, **settings):
        delta = kvedit.edit(lm, request, "kn", preset="gpt2-xl", **settings)
        try:
            return {name: delta.update(name).clone() for name in delta.names}
        finally:
            delta.revert(lm)

    fresh = [updates(REQUEST, threshold=t, edit_factor=f) for t, f in ((0.3, 2.0), (0.1, 8.0))]
    calls = []
    real = kn.attributions
    monkeypatch.setattr(kn, "attributions", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with kn.reused_attributions(lm):
        reused = [updates(REQUEST, threshold=t, edit_factor=f) for t, f in ((0.3, 2.0), (0.1, 8.0))]
        assert calls == [REQUEST.rewrite_prompt]  # one integration for both settings
        updates(REQUEST, max_steps=1)  # another step count: integrated anew
        updates([other, REQUEST])  # a call's later request sees the earlier one's edit: never from the memo
    assert calls == [REQUEST.rewrite_prompt] * 2 + [other.rewrite_prompt, REQUEST.rewrite_prompt]
    for one, two in zip(fresh, reused):
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
