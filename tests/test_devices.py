"""Device placement: a model spread by a device map (accelerate hooks, a layer offloaded to disk) edits and
reverts exactly as a plain one; offloaded weights are refused. GPU tests run where a GPU is present."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from kvedit import EditRequest, edit, load_model
from kvedit.editing.delta import EditError, WeightDelta
from kvedit.evaluation import target_nll

REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
FAST = dict(max_steps=3, stats_source="self", stats_tokens=256)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items() if v.device.type != "meta"}


@pytest.mark.parametrize("method, layers", [("ft-keys", (3,)), ("rome", (3,)), ("memit", (2, 3))])
def test_an_edit_under_a_device_map_equals_the_plain_edit_and_reverts(
    saved_llama, method, layers, tmp_path, monkeypatch, kvedit_cache
):
    plain = load_model(saved_llama)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
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


def test_editing_an_offloaded_layer_is_refused_and_changes_nothing(saved_llama, tmp_path, monkeypatch, kvedit_cache):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    mapped = load_model(saved_llama, device_map=device_map)
    before = _state(mapped)
    with pytest.raises(EditError, match="offloaded"):
        edit(mapped, REQUEST, "ft-values", layers=(1,), max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in _state(mapped).items())


def test_the_cli_takes_a_device_map(saved_llama, tmp_path, monkeypatch, capsys, kvedit_cache):
    from kvedit.cli import main

    edit_argv = [
        "edit",
        "--model",
        str(saved_llama),
        "--method",
        "ft-keys",
        "--layers",
        "1",
        "--subject",
        "the eiffel tower",
        "--prompt",
        "{} is located in the city of",
        "--new",
        "rome",
        "--true",
        "paris",
    ]
    code = main([*edit_argv, "--device-map", "auto", "--save", str(tmp_path / "p.safetensors")])
    assert code == 0 and (tmp_path / "p.safetensors").is_file()
    assert main([*edit_argv, "--save", str(tmp_path / "plain.safetensors")]) == 0
    # the patch is the plain edit's: layer 1's key modules only, the same weights, and it makes "rome" the answer
    mapped, plain = WeightDelta.load(tmp_path / "p.safetensors"), WeightDelta.load(tmp_path / "plain.safetensors")
    assert mapped.metadata["method"] == "ft-keys"
    keys = sorted(f"{path}.weight" for path in load_model(saved_llama).key_paths(1).values())
    assert sorted(mapped.names) == sorted(plain.names) == keys
    for name in plain.names:
        assert torch.equal(mapped.before[name], plain.before[name]), name
        torch.testing.assert_close(mapped.after[name], plain.after[name], rtol=1e-5, atol=1e-6)
    lm = load_model(saved_llama)
    before = target_nll(lm, [REQUEST.rewrite_prompt] * 2, ["rome", "paris"])
    mapped.apply(lm)
    after = target_nll(lm, [REQUEST.rewrite_prompt] * 2, ["rome", "paris"])
    assert after[0] < before[0] and after[0] < after[1]


# ---------------------------------------------------------------- accelerators (run where present)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", ["ft-keys", "ft-values", "rome", "memit", "pmet"])
def test_an_edit_on_the_gpu_matches_the_cpu(saved_llama, method, tmp_path, monkeypatch, kvedit_cache):
    kw = (
        dict(layers=(2,), max_steps=3)
        if method.startswith("ft")
        else dict(FAST, layers=(2, 3) if method != "rome" else (2,))
    )
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
def test_an_edit_across_two_gpus_matches_one(saved_llama, method, tmp_path, monkeypatch, kvedit_cache):
    kw = (
        dict(layers=(3,), max_steps=3)
        if method.startswith("ft")
        else dict(FAST, layers=(2, 3) if method != "rome" else (3,))
    )
    one = edit(load_model(saved_llama, device="cuda:0"), REQUEST, method, **kw)
    split = load_model(saved_llama, device_map="balanced")
    assert len({p.device for p in split.model.parameters()}) == 2
    two = edit(split, REQUEST, method, **kw)
    for name in one.after:
        torch.testing.assert_close(two.after[name].cpu(), one.after[name].cpu(), rtol=1e-3, atol=1e-4)
