"""Every architecture row, on a tiny random model: the key-value view, coefficients, an edit, revert."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from tiny_models import TINY_CONFIGS
from transformers.activations import ACT2FN

from kvedit import EditRequest, edit
from kvedit.evaluation import target_nll
from kvedit.models import ARCHITECTURES, UnsupportedModelError, architecture_for, ffn_memory, memory_coefficients

FAMILIES = sorted(ARCHITECTURES)
PROMPTS = ["the eiffel tower is located in the city of", "paris is the capital of"]


def ffn_input(lm, layer: int, prompts: list[str]) -> torch.Tensor:
    """The FFN's input h `[B, T, d_model]` at `layer`, captured from the first key module."""
    seen = {}
    module = lm.module(next(iter(lm.key_paths(layer).values())))
    handle = module.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        lm.model(**enc)
    handle.remove()
    h = seen["h"]
    return h.view(len(prompts), -1, h.shape[-1]) if h.dim() == 2 else h


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_shapes(family):
    lm = tiny(family)
    d_ff, d_model = 64, 32
    for layer in range(lm.num_layers):
        mem = ffn_memory(lm, layer)
        assert set(mem.keys) == set(ARCHITECTURES[family].keys)
        for k in mem.keys.values():
            assert k.shape == (d_ff, d_model)
        assert mem.values.shape == (d_ff, d_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_coefficients_match_manual_ffn(family):
    """m = f(h·Kᵀ + b) (⊙ h·K_upᵀ when gated) from the weights equals the traced values-module input,
    and m·V + b equals the values module's output, so both orientations are right."""
    lm = tiny(family)
    layer = 2
    h = ffn_input(lm, layer, PROMPTS)
    mem = ffn_memory(lm, layer)
    act = ACT2FN[lm.arch.activation(lm.model.config)]

    def proj(role: str) -> torch.Tensor:
        bias = lm.module(lm.key_paths(layer, (role,))[role]).bias
        return h @ mem.keys[role].T + (0 if bias is None else bias)

    with torch.no_grad():
        manual = act(proj("gate")) * proj("up") if lm.arch.gated else act(proj("key"))
        coeffs, mask = memory_coefficients(lm, PROMPTS, [layer])
        valid = mask.bool()
        torch.testing.assert_close(coeffs[layer][valid], manual[valid], rtol=1e-5, atol=1e-5)

        v_bias = lm.module(lm.values_path(layer)).bias
        out = manual @ mem.values + (0 if v_bias is None else v_bias)
        seen = {}
        handle = lm.module(lm.values_path(layer)).register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
        lm.model(**lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right"))
        handle.remove()
        torch.testing.assert_close(seen["o"].view_as(out)[valid], out[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ft-keys", "ft-values"])
def test_ft_edit_flips_target_and_reverts_exactly(family, method):
    lm = tiny(family)
    request = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
    prompt = request.rewrite_prompt
    original = {n: p.detach().clone() for n, p in lm.model.state_dict().items()}
    nll_new, nll_true = target_nll(lm, [prompt, prompt], ["rome", "paris"]).tolist()
    if nll_new < nll_true:  # make the random model prefer the true target first
        request = EditRequest(request.prompt, request.subject, target_new="paris", target_true="rome")

    delta = edit(lm, request, method, lr=1e-2, max_steps=40)

    nll_new, nll_true = target_nll(lm, [prompt, prompt], [request.target_new, request.target_true]).tolist()
    assert nll_new < nll_true
    changed = [n for n in original if not torch.equal(original[n], lm.model.state_dict()[n])]
    assert sorted(changed) == sorted(delta.names)
    delta.revert(lm)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_unsupported_family_names_supported_ones():
    config = TINY_CONFIGS["llama"].__class__()
    config.model_type = "mamba"
    with pytest.raises(UnsupportedModelError, match=r"llama.*ARCHITECTURES"):
        architecture_for(config)


def test_gated_only_targets_are_refused_on_ungated_models():
    lm = tiny("gpt2")
    request = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
    with pytest.raises(ValueError, match="no key module"):
        edit(lm, request, "ft-key-gate")


@pytest.mark.parametrize("family", [f for f in FAMILIES if ARCHITECTURES[f].objective == "causal"])
def test_cached_decoding_equals_full_passes_without_deprecated_cache_arguments(family, monkeypatch):
    """Greedy decoding through the KV cache gives the tokens full forward passes give, and every cached forward
    (decoding, the split prefix/suffix pass of target optimisation) passes and reads the cache under the names
    this transformers takes: a FutureWarning or transformers' deprecation log line fails the test."""
    import warnings

    import transformers.utils.generic as hf_generic

    from kvedit.evaluation.generation import generate_ids

    deprecations = []
    monkeypatch.setattr(hf_generic.logger, "warning_once", lambda msg, *a, **k: deprecations.append(msg))
    lm = tiny(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cached = generate_ids(lm, PROMPTS[:1], total_tokens=12, top_k=1)[0]
        request = EditRequest(
            "{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"
        )
        edit(lm, request, "rome", layers=(1,), max_steps=2, stats_tokens=200).revert(lm)
    assert not deprecations
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        while len(ids) < 12:
            ids = ids + [int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
    assert cached == ids
