"""Trace: reads match the model's own hidden states; additions land at the chosen positions only."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from kvedit.models import Addition, Trace

PROMPTS = ["the eiffel tower is located in the city of", "berlin is the capital of"]


def encode(lm):
    return lm.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "opt"])
def test_residual_read_equals_hidden_states(family):
    lm = tiny(family)
    enc = encode(lm)
    with torch.no_grad(), Trace(lm, read=[("residual", 1), ("residual", -1)]) as tr:
        out = lm.model(**enc, output_hidden_states=True)
    torch.testing.assert_close(tr["residual", 1], out.hidden_states[2])
    # the last block's output: the models' last hidden state is it after the final norm
    last = tr["residual", lm.num_layers - 1]
    assert not torch.allclose(last, out.hidden_states[-1])
    torch.testing.assert_close(lm.module(lm.arch.final_norm)(last), out.hidden_states[-1])


@pytest.mark.parametrize("family", ["llama", "opt", "gptj"])
def test_addition_changes_only_its_position_and_later(family):
    lm = tiny(family)
    enc = encode(lm)
    with torch.no_grad():
        base = lm.model(**enc).logits
        positions = torch.tensor([3, 2])
        delta = torch.randn(lm.d_model)
        with Trace(lm, add={("ffn_out", 1): Addition(delta, positions)}):
            edited = lm.model(**enc).logits
    for row, pos in enumerate(positions.tolist()):
        torch.testing.assert_close(edited[row, :pos], base[row, :pos])  # causal: earlier tokens untouched
        assert not torch.allclose(edited[row, pos], base[row, pos])


def test_positions_select_one_token_per_sequence_and_keep_gradients():
    lm = tiny("llama")
    enc = encode(lm)
    delta = torch.zeros(lm.d_model, requires_grad=True)
    positions = torch.tensor([5, 1])
    with Trace(
        lm,
        read=[("coefficients", 2)],
        add={("attn_out", 1): Addition(delta, positions)},
        positions=positions,
        detach=False,
    ) as tr:
        lm.model(**enc)
    coeffs = tr["coefficients", 2]
    assert coeffs.shape == (2, 64)
    coeffs.sum().backward()
    # the same as reading every token and picking each sequence's position, values and gradient
    full_delta = torch.zeros(lm.d_model, requires_grad=True)
    with Trace(
        lm, read=[("coefficients", 2)], add={("attn_out", 1): Addition(full_delta, positions)}, detach=False
    ) as full:
        lm.model(**enc)
    picked = full["coefficients", 2][torch.arange(2), positions]
    torch.testing.assert_close(coeffs.detach(), picked.detach())
    assert not torch.allclose(picked, full["coefficients", 2][torch.arange(2), positions - 1])  # other tokens differ
    picked.sum().backward()
    assert delta.grad.abs().sum() > 0
    torch.testing.assert_close(delta.grad, full_delta.grad)


def test_stop_ends_the_forward_pass_after_the_last_read():
    lm = tiny("llama")
    reached = []
    handle = lm.module(f"{lm.arch.layers}.3").register_forward_pre_hook(lambda m, a: reached.append(3))
    with torch.no_grad(), Trace(lm, read=[("key:gate", 1)], stop=True) as tr:
        lm.model(**encode(lm))
    handle.remove()
    assert reached == [] and tr["key:gate", 1].shape[-1] == 64


def test_unknown_site_is_a_clear_error():
    lm = tiny("llama")
    with pytest.raises(ValueError, match="unknown site kind"):
        with Trace(lm, read=[("mlp_hidden", 0)]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        Trace(lm, read=[("residual", 12)])
