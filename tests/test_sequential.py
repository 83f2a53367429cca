"""Sequential editing and ready-made settings objects."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import snapshot, tiny

import kvedit.bench.sequential as sequential_module
from kvedit import EditRequest, edit
from kvedit.bench.sequential import sequential_edit
from kvedit.editing import FTHyperParams, make_settings

REQUESTS = [
    EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"),
    EditRequest("{} is located in the city of", "the colosseum", target_new="london", target_true="rome"),
    EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
]


def test_sequential_edits_stack_and_revert_as_one_delta():
    lm = tiny("llama")
    original = snapshot(lm)
    delta, history = sequential_edit(
        lm, REQUESTS, "ft-values", batch_size=2, progress=False, lr=1e-2, max_steps=15, layers=(1,)
    )
    assert [h["n_edited"] for h in history] == [2, 3] and [h["batch"] for h in history] == [0, 1]
    assert all(h["time_s"] > 0 for h in history)
    assert history[-1]["all_n"] == 3 and history[-1]["batch_n"] == 1
    edited = snapshot(lm)
    assert not torch.equal(
        edited["model.layers.1.mlp.down_proj.weight"], original["model.layers.1.mlp.down_proj.weight"]
    )
    delta.revert(lm)
    assert all(torch.equal(v, original[k]) for k, v in snapshot(lm).items())
    delta.apply(lm)
    assert all(torch.equal(v, edited[k]) for k, v in snapshot(lm).items())


def test_a_failing_batch_reverts_every_earlier_batch(monkeypatch):
    lm = tiny("llama")
    original = snapshot(lm)
    real = sequential_module.edit
    calls = []

    def second_fails(lm, batch, method, **kw):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm, batch, method, **kw)

    monkeypatch.setattr(sequential_module, "edit", second_fails)
    with pytest.raises(KeyboardInterrupt):
        sequential_edit(lm, REQUESTS, "ft-keys", batch_size=1, progress=False, max_steps=3)
    assert calls == [1, 1] and all(torch.equal(v, original[k]) for k, v in snapshot(lm).items())


def test_a_settings_object_is_used_as_given():
    lm = tiny("llama")
    settings = FTHyperParams(target="values", layers=(2,), lr=1e-2, max_steps=1, early_stop_nll=None)
    delta = edit(lm, REQUESTS[0], "ft-values", hparams=settings)
    assert delta.metadata["result"]["steps"] == 1 and delta.metadata["layers"] == [2]
    assert delta.names == ["model.layers.2.mlp.down_proj.weight"]
    # make_settings builds the same object from overrides (None means "the preset's value")
    built = make_settings(lm, "ft-values", layers=(2,), lr=1e-2, max_steps=1, early_stop_nll=None)
    assert built == replace(settings, early_stop_nll=0.1)
