"""benchmarks/target_reach.py on a tiny model: its accuracies are the harness's, its clamp count is right, and
it leaves the weights as it found them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import tiny

from kvedit import EditRequest, edit
from kvedit.evaluation.zsre import zsre_case_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reach():
    spec = importlib.util.spec_from_file_location("target_reach", ROOT / "benchmarks" / "target_reach.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(tmp_path, monkeypatch, kvedit_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("the eiffel tower is located in the city of paris" for _ in range(200)))
    lm = tiny("llama")
    requests = [
        EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"),
        EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
    ]
    return lm, requests, dict(layers=(1, 2), stats_source=str(corpus), stats_tokens=1000, max_steps=3)


def test_parse_variant(reach):
    assert reach.parse_variant("pmet") == ("pmet", {})
    assert reach.parse_variant("pmet:clamp_norm_factor=4;attn_delta=false") == (
        "pmet",
        {"clamp_norm_factor": 4, "attn_delta": False},
    )
    assert reach.split_variants("memit:layers=[6,7],pmet,pmet:layers=[1, 2];lr=0.5") == [
        "memit:layers=[6,7]",
        "pmet",
        "pmet:layers=[1, 2];lr=0.5",
    ]


def test_accuracies_are_the_harness_efficacy_and_weights_come_back(reach, setup):
    lm, requests, kw = setup
    before = {n: t.clone() for n, t in lm.model.state_dict().items()}
    result = reach.measure(lm, requests, "pmet", kw)
    after = lm.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    for request, case in zip(requests, result["cases"]):
        # no vector added: the zsRE harness's efficacy of the unedited model
        assert reach.token_accuracy(lm, request, {}) == pytest.approx(
            zsre_case_metrics(lm, [request])[0]["efficacy_accuracy"]
        )
        # "edited" is the harness's efficacy after the same edit (the same targets: deterministic optimisation)
        delta = edit(lm, request, "pmet", **kw)
        assert case["edited"] == pytest.approx(zsre_case_metrics(lm, [request])[0]["efficacy_accuracy"])
        delta.revert(lm)
    assert set(result["at_clamp"]) == {"attn_out", "ffn_out"}


def test_written_sites_and_clamp(reach, setup):
    lm, requests, kw = setup
    memit = reach.measure(lm, requests, "memit", kw)  # MEMIT writes the one vector it optimises
    assert all(c["reach"] == c["written_only"] for c in memit["cases"])
    tight = reach.measure(lm, requests, "pmet-no-attn-delta", kw | dict(clamp_norm_factor=1e-4, lr=1.0))
    assert tight["at_clamp"] == {"ffn_out": len(requests)}
    assert reach.sites_of(reach.make_settings(lm, "pmet-update-attn", **kw))[1] == [("attn_out", 2), ("ffn_out", 2)]
    # one edit layer writes exactly the remainder it measured (ROME: one layer, no spread to report)
    one = reach.measure(lm, requests, "memit", kw | dict(layers=(2,)))
    assert one["written_sum"] == pytest.approx(1.0)
    assert one["remainder_first"] == pytest.approx(one["remainder_last"])
    assert "written_sum" not in reach.measure(lm, requests[:1], "rome", kw | dict(layers=(1,)))
