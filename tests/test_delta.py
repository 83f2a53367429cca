"""WeightDelta: exact apply/revert, patch files, refusal on other models, restore on failure."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import snapshot, tiny

from kvedit import EditRequest, WeightDelta, edit
from kvedit.editing import EditError, PatchMismatchError
from kvedit.evaluation import target_nll

REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")


def assert_same(lm, saved) -> None:
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), f"{name} changed"


def test_save_load_apply_reproduces_the_edit(tmp_path, tiny_llama):
    original = snapshot(tiny_llama)
    delta = edit(tiny_llama, REQUEST, "ft-values", lr=1e-2, max_steps=5)
    edited = snapshot(tiny_llama)
    path = delta.save(tmp_path / "edit.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["method"] == "ft-values" and meta["requests"][0]["subject"] == "the eiffel tower"
    assert meta["hparams"]["lr"] == 1e-2 and meta["model_fingerprint"] and meta["kvedit_version"]

    delta.revert(tiny_llama)
    assert_same(tiny_llama, original)
    loaded = WeightDelta.load(path)
    assert loaded.metadata == meta
    loaded.apply(tiny_llama)
    assert_same(tiny_llama, edited)
    loaded.revert(tiny_llama)
    assert_same(tiny_llama, original)


def test_apply_twice_and_revert_unedited_are_refused(tiny_llama):
    delta = edit(tiny_llama, REQUEST, "ft-keys", lr=1e-2, max_steps=3)
    with pytest.raises(PatchMismatchError, match="differ from the unedited weights"):
        delta.apply(tiny_llama)
    delta.revert(tiny_llama)
    with pytest.raises(PatchMismatchError, match="differ from the edited weights"):
        delta.revert(tiny_llama)


def test_patch_for_another_model_is_refused(tmp_path, tiny_llama):
    delta = edit(tiny_llama, REQUEST, "ft-values", lr=1e-2, max_steps=3)
    delta.save(tmp_path / "p.safetensors")
    other = tiny("llama", seed=1)  # same shapes, other weights
    saved = snapshot(other)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        WeightDelta.load(tmp_path / "p.safetensors").apply(other)
    assert_same(other, saved)
    with pytest.raises(PatchMismatchError, match="no parameter"):
        WeightDelta.load(tmp_path / "p.safetensors").apply(tiny("gpt2"))


def test_non_patch_files_are_refused_without_unpickling(tmp_path):
    pickled = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(2)}, pickled)
    with pytest.raises(PatchMismatchError, match="not a readable safetensors patch"):
        WeightDelta.load(pickled)
    with pytest.raises(FileNotFoundError):
        WeightDelta.load(tmp_path / "missing.safetensors")


class Boom(Exception):
    pass


def _fail_on_call(lm, n: int, exc: BaseException | None = None, nan: bool = False):
    """Hook the last layer so the n-th forward pass raises `exc` or returns NaN."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] >= n:
            if nan:
                return output * float("nan")
            raise exc
        return output

    return lm.module(lm.values_path(-1)).register_forward_hook(hook)


@pytest.mark.parametrize(
    "failure",
    [dict(exc=Boom("mid-edit")), dict(exc=KeyboardInterrupt()), dict(nan=True)],
    ids=["exception", "ctrl-c", "nan-loss"],
)
@pytest.mark.parametrize("method", ["ft-keys", "ft-values"])
def test_failure_mid_edit_restores_weights_bit_exactly(tiny_llama, method, failure):
    saved = snapshot(tiny_llama)
    flags = {n: p.requires_grad for n, p in tiny_llama.model.named_parameters()}
    handle = _fail_on_call(tiny_llama, 3, **failure)  # two optimiser steps have changed weights by then
    expected = (EditError,) if failure.get("nan") else (type(failure["exc"]),)
    with pytest.raises(expected):
        edit(tiny_llama, REQUEST, method, lr=1e-2, max_steps=10, early_stop_nll=None)
    handle.remove()
    assert_same(tiny_llama, saved)
    assert flags == {n: p.requires_grad for n, p in tiny_llama.model.named_parameters()}


def test_nan_weights_are_refused_and_restored(tiny_llama, monkeypatch):
    """An optimiser that writes NaN into the weights without a NaN loss is caught at the end."""
    saved = snapshot(tiny_llama)
    real_step = torch.optim.AdamW.step

    def bad_step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0][0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", bad_step)
    with pytest.raises(EditError, match="NaN/Inf|became"):
        edit(tiny_llama, REQUEST, "ft-values", lr=1e-2, max_steps=1, early_stop_nll=None)
    assert_same(tiny_llama, saved)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layers=(99,)), "out of range"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(max_steps=0), "max_steps must be >= 1"),
        (dict(norm_constraint=-1.0), "norm_constraint"),
        (dict(preset="nope"), "unknown preset"),
        (dict(momentum=0.9), "unknown setting"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(tiny_llama, overrides, message):
    with pytest.raises(ValueError, match=message):
        edit(tiny_llama, REQUEST, "ft-keys", **overrides)


def test_norm_constraint_bounds_every_weight(tiny_llama):
    eps = 1e-4
    delta = edit(tiny_llama, REQUEST, "ft-values", preset="ft-l", norm_constraint=eps, lr=1e-2, max_steps=5)
    for name in delta.names:
        assert delta.update(name).abs().max() <= eps * 1.001


@pytest.mark.parametrize(
    "preset, optimiser, lr, decay",
    [("qiu2024", torch.optim.Adam, 5e-4, 0.5), ("default", torch.optim.AdamW, 2e-3, 0.0)],
)
def test_presets_run_their_optimiser(tiny_llama, monkeypatch, preset, optimiser, lr, decay):
    built = []
    real_init = torch.optim.Optimizer.__init__

    def spy(self, params, defaults, *args, **kwargs):
        built.append((type(self), defaults["lr"], defaults["weight_decay"]))
        return real_init(self, params, defaults, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", spy)
    delta = edit(tiny_llama, REQUEST, "ft-keys", preset=preset, max_steps=2, early_stop_nll=None)
    assert built and set(built) == {(optimiser, lr, decay)}  # the optimiser that ran, not the preset table
    assert delta.metadata["hparams"]["preset"] == preset


def test_batch_edit_lowers_every_requests_loss(tiny_llama):
    requests = [REQUEST, EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany")]
    prompts = [r.rewrite_prompt for r in requests]
    targets = [r.target_new for r in requests]
    before = target_nll(tiny_llama, prompts, targets)
    edit(tiny_llama, requests, "ft-keys", lr=1e-2, max_steps=10)
    after = target_nll(tiny_llama, prompts, targets)
    assert (after < before).all()
