"""FT-L as ROME's `baselines/ft` runs it: the prompt-last loss, the norm constraint and how to switch it off,
checked against a plain re-implementation of the reference loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny

from kvedit import EditRequest, edit
from kvedit.editing.finetune import FT_PRESETS, encode_request

# a two-token target: "prompt_last" and "teacher_forced" differ only for targets of more than one token
REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome italy", target_true="paris")


def reference_ft_l(lm, request: EditRequest, layer: int, lr: float, steps: int, eps: float | None):
    """The reference FT loop written out plainly: Adam on one values matrix, the loss at the prompt's
    last position averaged over the target tokens, no step (and a stop) once it is below 1e-2, and the
    weights clamped within ±eps of the original after every step when eps is a number."""
    weight = lm.module(lm.values_path(layer)).weight
    original = weight.detach().clone()
    lm.model.requires_grad_(False)
    weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr, weight_decay=0.0)
    prompt = torch.tensor([lm.tokenizer(request.rewrite_prompt)["input_ids"]])
    target = lm.tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    losses = []
    for _ in range(steps):
        logprobs = F.log_softmax(lm.model(input_ids=prompt).logits[0, -1].float(), -1)
        loss = -logprobs[target].mean()
        losses.append(loss.item())
        if loss.item() >= 1e-2:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if eps is not None:
            with torch.no_grad():
                weight.copy_(torch.clamp(weight, original - eps, original + eps))
        if loss.item() < 1e-2:
            break
    edited = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(original)
    weight.requires_grad_(False)
    weight.grad = None
    return edited, losses


def test_ft_l_preset_is_ropes_constrained_fine_tuning():
    preset = FT_PRESETS["ft-l"]
    assert (preset["optimizer"], preset["lr"], preset["max_steps"], preset["weight_decay"]) == ("adam", 5e-4, 25, 0.0)
    assert (preset["objective"], preset["norm_constraint"], preset["early_stop_nll"]) == ("prompt_last", 5e-4, 1e-2)


def test_prompt_last_scores_every_target_token_at_the_prompts_last_position():
    lm = tiny("llama")
    enc = encode_request(lm, REQUEST, "prompt_last")
    prompt_ids = lm.tokenizer(REQUEST.rewrite_prompt)["input_ids"]
    assert list(enc.input_ids) == prompt_ids
    assert list(enc.target_ids) == lm.tokenizer(" rome italy", add_special_tokens=False)["input_ids"]
    assert enc.positions == (len(prompt_ids) - 1,) * 2
    teacher = encode_request(lm, REQUEST, "teacher_forced")
    assert teacher.positions == (len(prompt_ids) - 1, len(prompt_ids))


@pytest.mark.parametrize("eps", [None, 2e-3])
def test_ft_l_matches_the_reference_loop(eps):
    """Same weights as the reference after the same steps, with the constraint off (0) and on."""
    lm = tiny("llama")
    layer, lr, steps = 1, 1e-2, 6
    expected, ref_losses = reference_ft_l(lm, REQUEST, layer, lr, steps, eps)
    delta = edit(
        lm,
        REQUEST,
        "ft-values",
        preset="ft-l",
        layers=(layer,),
        lr=lr,
        max_steps=steps,
        norm_constraint=eps if eps is not None else 0.0,
    )
    name = f"{lm.values_path(layer)}.weight"
    torch.testing.assert_close(lm.model.state_dict()[name], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(delta.metadata["result"]["loss"][:steps]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6
    )
    assert delta.metadata["hparams"]["objective"] == "prompt_last"
    assert delta.metadata["hparams"]["norm_constraint"] == (eps or 0.0)


def test_switching_the_constraint_off_is_not_ignored():
    """The bug that made kvedit's FT-L flip 0 of 6 facts: `norm_constraint=None` meant "the preset's",
    so the ±5e-4 clamp stayed on. 0 switches it off; the weights then move further than 5e-4."""
    lm = tiny("llama")
    delta = edit(lm, REQUEST, "ft-values", preset="ft-l", layers=(1,), lr=1e-2, max_steps=5, norm_constraint=0.0)
    assert delta.metadata["hparams"]["norm_constraint"] == 0.0
    assert max(delta.update(n).abs().max().item() for n in delta.names) > 10 * 5e-4
    delta.revert(lm)
    kept = edit(lm, REQUEST, "ft-values", preset="ft-l", layers=(1,), lr=1e-2, max_steps=5, norm_constraint=None)
    assert kept.metadata["hparams"]["norm_constraint"] == 5e-4  # None: the preset's value
    assert max(kept.update(n).abs().max().item() for n in kept.names) <= 5e-4 * 1.001


def test_prompt_last_is_refused_for_masked_models():
    lm = tiny("bert")
    with pytest.raises(ValueError, match="prompt_last.*masked"):
        edit(lm, EditRequest("{} is in", "paris", target_new="rome"), "ft-values", preset="ft-l")
