"""The shared test helpers and fixtures themselves: cached tiny models are fresh and independent copies, every
test has its own kvedit cache, shared data is a failure under CI when missing, the CLI helper's exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import need_shared, run, same, snapshot, tiny
from tiny_models import tiny_lm

from kvedit.models import ARCHITECTURES
from kvedit.models.cache import cache_dir


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_a_cached_tiny_model_is_a_fresh_build(family):
    built = tiny_lm(family, seed=3)
    after_build = torch.rand(4)  # the global RNG as tiny_lm leaves it
    copy = tiny(family, seed=3)
    assert torch.equal(torch.rand(4), after_build)
    assert same(snapshot(copy), snapshot(built)) and copy.base_fingerprint == built.base_fingerprint
    assert copy.name == built.name and copy.arch is built.arch and copy.memo == {} and not copy.model.training
    assert copy.tokenizer("the city of paris")["input_ids"] == built.tokenizer("the city of paris")["input_ids"]
    tied = built.model.get_output_embeddings().weight is built.model.get_input_embeddings().weight
    assert (copy.model.get_output_embeddings().weight is copy.model.get_input_embeddings().weight) == tied


def test_an_edited_copy_leaks_into_no_other():
    first = tiny("llama")
    before = snapshot(first)
    with torch.no_grad():
        next(first.model.parameters()).add_(1.0)
    first.model.config.rms_norm_eps = 0.5
    first.memo["x"] = 1
    second = tiny("llama")
    assert same(snapshot(second), before) and not same(snapshot(first), before)
    assert second.model.config.rms_norm_eps != 0.5 and second.memo == {}
    assert not same(snapshot(tiny("llama", seed=1)), before)  # another seed, other weights


def test_a_test_runs_on_its_modules_temporary_cache(module_cache, tmp_path):
    assert cache_dir() == module_cache and not module_cache.is_relative_to(tmp_path)
    assert not module_cache.exists() or not any(module_cache.rglob("*.safetensors"))  # nothing from elsewhere


def test_kvedit_cache_is_the_tests_own(kvedit_cache, module_cache, tmp_path):
    assert cache_dir() == kvedit_cache == tmp_path / "cache" != module_cache
    assert os.environ["KVEDIT_CACHE"] == str(kvedit_cache) and not kvedit_cache.exists()


@pytest.mark.bundled
def test_a_bundled_test_keeps_the_shared_cache(tmp_path):
    assert os.environ.get("KVEDIT_CACHE") != str(tmp_path / "cache")


def test_missing_shared_data_skips_outside_ci_and_fails_under_ci(tmp_path, monkeypatch):
    missing = tmp_path / "shared" / "data" / "nothing.json"
    assert need_shared(tmp_path) == tmp_path
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nothing.json is missing"):
        need_shared(tmp_path, missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nothing.json is missing: under CI"):
        need_shared(missing)
    assert need_shared(Path(tmp_path)) == tmp_path


def test_run_returns_argparse_exits_as_codes():
    code, out, err = run("models")
    assert code == 0 and "\nllama " in "\n" + out
    code, out, err = run("edit", "--layers", "three")
    assert code == 2 and "comma-separated layer numbers" in err and out == ""
    code, out, _ = run("--help")
    assert code == 0 and "usage" in out
