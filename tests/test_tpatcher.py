"""T-Patcher: an edit adds memories to the last FFN layer; the memory fires on the edit and not on its
neighbourhood; the patch grows and shrinks the layer bit-exactly; a saved model loads in plain transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot, tiny
from transformers import AutoModelForCausalLM

import kvedit
from kvedit.editing.delta import PatchMismatchError, WeightDelta
from kvedit.models import load_model
from kvedit.models.architectures import ARCHITECTURES
from kvedit.models.ffn_width import ffn_width
from kvedit.models.saving import save_model_folder
from kvedit.models.tracing import Trace

TEXT = (
    "the eiffel tower is located in the city of paris. the colosseum is located in the city of rome. "
    "berlin is the capital of germany. the louvre is a famous landmark in paris.\n\n"
)
REQUEST = kvedit.EditRequest(
    "{} is located in the city of",
    "the eiffel tower",
    target_new="rome",
    target_true="paris",
    neighborhood_prompts=("the colosseum is located in the city of", "the louvre is a famous landmark in"),
)
FAST = {"max_steps": 150}
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = TEXT * 30


def preactivations(lm, layer, start, prompt):
    """The new memories' pre-activation k·q (+ b) at every token of `prompt`, `[T, n]`."""
    keys = lm.key_paths(layer)
    gate = keys.get("gate", next(iter(keys.values())))
    weight = lm.model.get_parameter(f"{gate}.weight").detach()
    weight = weight[:, start:].T if lm.arch.transposed else weight[start:]
    bias = dict(lm.model.named_parameters()).get(f"{gate}.bias")
    with torch.no_grad(), Trace(lm, read=[("ffn_in", layer)]) as tr:
        lm.model(input_ids=lm.tokenizer(prompt, return_tensors="pt")["input_ids"])
    q = tr["ffn_in", layer][0]
    return (q @ weight.T + (bias[start:] if bias is not None and not lm.arch.gated else 0)).detach()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_new_memory_fires_on_the_edit_and_stays_silent_on_the_neighbourhood(corpus, family):
    lm = tiny(family)
    layer = lm.num_layers - 1
    width = ffn_width(lm, layer)
    delta = kvedit.edit(lm, REQUEST, "t-patcher", stats_source=corpus, stats_tokens=600, **FAST)
    added = delta.records[0]
    assert added >= 1 and ffn_width(lm, layer) == width + added
    assert delta.metadata["result"]["memories_added"] == [added] and delta.metadata["grown"]
    edit_prompt = REQUEST.rewrite_prompt
    on_edit = preactivations(lm, layer, width, edit_prompt)[-1]  # where the first target token is predicted
    assert float(on_edit.max()) > 0
    for prompt in REQUEST.neighborhood_prompts:
        silent = preactivations(lm, layer, width, prompt)
        assert float(silent.max()) < float(on_edit.max()) - 1, prompt
    from kvedit.evaluation.probe import target_probabilities

    p = target_probabilities(lm, REQUEST)["efficacy"][0]
    assert p["target_new"] > p["target_true"]  # the edit flips the rewrite prompt


@pytest.mark.parametrize("family", [f for f, a in ARCHITECTURES.items() if a.objective == "causal"])
def test_every_causal_family_grows_and_reverts_bit_exactly(corpus, family, tmp_path):
    lm = tiny(family)
    before = snapshot(lm)
    delta = kvedit.edit(lm, REQUEST, "t-patcher", stats_source=corpus, stats_tokens=300, max_steps=30)
    grown = delta.metadata["grown"]
    assert grown and all(lm.model.state_dict()[n].shape != before[n].shape for n in grown)
    saved = WeightDelta.load(delta.save(tmp_path / "p.safetensors"))
    saved.revert(lm)
    assert all(torch.equal(lm.model.state_dict()[n], before[n]) for n in before)
    saved.apply(lm)  # and again, from the file
    assert all(torch.equal(lm.model.state_dict()[n], delta.after[n]) for n in grown)
    with pytest.raises(PatchMismatchError, match="shape"):
        saved.apply(lm)


def test_an_applied_folder_loads_in_plain_transformers_and_reverts_to_the_original(corpus, tmp_path):
    lm = tiny("llama")
    original = tmp_path / "original"
    save_model_folder(lm, original)
    delta = kvedit.edit(lm, REQUEST, "t-patcher", stats_source=corpus, stats_tokens=300, max_steps=30)
    ids = lm.tokenizer(REQUEST.rewrite_prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = lm.model(input_ids=ids).logits
    edited = tmp_path / "edited"
    save_model_folder(lm, edited)
    plain = AutoModelForCausalLM.from_pretrained(edited)  # every layer padded with inert memories
    assert plain.config.intermediate_size == ffn_width(lm, lm.num_layers - 1)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    reloaded = load_model(str(edited))  # kvedit trims the inert padding again
    assert [ffn_width(reloaded, l) for l in range(lm.num_layers)] == [ffn_width(lm, l) for l in range(lm.num_layers)]
    delta.revert(reloaded)
    restored = tmp_path / "restored"
    save_model_folder(reloaded, restored)
    back, first = load_model(str(restored)), load_model(str(original))
    assert back.model.config.intermediate_size == first.model.config.intermediate_size
    assert all(torch.equal(back.model.state_dict()[n], t) for n, t in first.model.state_dict().items())


def test_a_request_the_model_already_answers_adds_nothing(corpus):
    lm = tiny("llama")
    ids = lm.tokenizer(REQUEST.rewrite_prompt, return_tensors="pt")["input_ids"]
    top = lm.tokenizer.decode([int(lm.model(input_ids=ids).logits[0, -1].argmax())]).strip()
    request = kvedit.EditRequest(REQUEST.prompt, REQUEST.subject, target_new=top, target_true="paris")
    width = ffn_width(lm, lm.num_layers - 1)
    delta = kvedit.edit(lm, request, "t-patcher", stats_source=corpus, stats_tokens=300, max_steps=30)
    assert delta.records == [0] and ffn_width(lm, lm.num_layers - 1) == width and not delta.metadata.get("grown")


def test_t_patcher_refuses_several_layers_and_masked_models():
    with pytest.raises(ValueError, match="one layer"):
        kvedit.edit(tiny("llama"), REQUEST, "t-patcher", layers=(2, 3))
    with pytest.raises(ValueError, match="masked"):
        kvedit.edit(tiny("bert"), REQUEST, "t-patcher")
