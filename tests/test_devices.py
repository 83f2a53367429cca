"""Device placement: a model spread by a device map (accelerate hooks, a layer offloaded to disk) edits and
reverts exactly as a plain one; offloaded weights are refused. GPU tests run where a GPU is present."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_lm

from kvedit import EditRequest, edit, load_model
from kvedit.editing.delta import EditError

REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
FAST = dict(max_steps=3, stats_source="self", stats_tokens=256)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_lm("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items() if v.device.type != "meta"}


@pytest.mark.parametrize("method, layers", [("ft-keys", (3,)), ("rome", (3,)), ("memit", (2, 3))])
def test_an_edit_under_a_device_map_equals_the_plain_edit_and_reverts(saved_llama, method, layers, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))
    plain = load_model(saved_llama)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    mapped = load_model(saved_llama, device_map=device_map)
    assert hasattr(mapped.module("model.layers.1"), "_hf_hook")  # accelerate really hooks the model
    kw = dict(FAST, layers=layers) if method != "ft-keys" else dict(layers=layers, max_steps=3)
    expected = edit(plain, REQUEST, method, **kw)
    before = _state(mapped)
    delta = edit(mapped, REQUEST, method, **kw)
    for name in delta.after:
        torch.testing.assert_close(delta.after[name], expected.after[name], rtol=1e-5, atol=1e-6)
    delta.revert(mapped)
    assert all(torch.equal(before[k], v) for k, v in _state(mapped).items())


def test_editing_an_offloaded_layer_is_refused_and_changes_nothing(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    mapped = load_model(saved_llama, device_map=device_map)
    before = _state(mapped)
    with pytest.raises(EditError, match="offloaded"):
        edit(mapped, REQUEST, "ft-values", layers=(1,), max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in _state(mapped).items())


def test_the_cli_takes_a_device_map(saved_llama, tmp_path, monkeypatch, capsys):
    from kvedit.cli import main

    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))
    code = main(["edit", "--model", str(saved_llama), "--device-map", "auto", "--method", "ft-keys", "--layers", "1",
                 "--subject", "the eiffel tower", "--prompt", "{} is located in the city of", "--new", "rome",
                 "--save", str(tmp_path / "p.safetensors")])
    assert code == 0 and (tmp_path / "p.safetensors").is_file()


# ---------------------------------------------------------------- accelerators (run where present)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", ["ft-keys", "ft-values", "rome", "memit", "pmet"])
def test_an_edit_on_the_gpu_matches_the_cpu(saved_llama, method, tmp_path, monkeypatch):
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))
    kw = dict(layers=(2,), max_steps=3) if method.startswith("ft") else dict(FAST, layers=(2, 3) if method != "rome" else (2,))
    on_cpu = edit(load_model(saved_llama), REQUEST, method, **kw)
    lm = load_model(saved_llama, device="cuda")
    before = _state(lm)
    on_gpu = edit(lm, REQUEST, method, **kw)
    for name in on_cpu.after:
        torch.testing.assert_close(on_gpu.after[name].cpu(), on_cpu.after[name], rtol=1e-3, atol=1e-4)
    on_gpu.revert(lm)
    assert all(torch.equal(before[k], v) for k, v in _state(lm).items())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("method", ["ft-keys", "rome", "memit", "pmet"])
def test_an_edit_across_two_gpus_matches_one(saved_llama, method, tmp_path, monkeypatch):
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))
    kw = dict(layers=(3,), max_steps=3) if method.startswith("ft") else dict(FAST, layers=(2, 3) if method != "rome" else (3,))
    one = edit(load_model(saved_llama, device="cuda:0"), REQUEST, method, **kw)
    split = load_model(saved_llama, device_map="balanced")
    assert len({p.device for p in split.model.parameters()}) == 2
    two = edit(split, REQUEST, method, **kw)
    for name in one.after:
        torch.testing.assert_close(two.after[name].cpu(), one.after[name].cpu(), rtol=1e-3, atol=1e-4)
