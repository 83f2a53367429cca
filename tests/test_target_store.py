"""Target vectors reused across editors and processes: the same updates as a fresh optimisation, never
after the weights changed, and bench edit times that still count the optimisation."""

from __future__ import annotations


import pytest
import torch
from helpers import tiny, write_facts

from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import BenchError, load_cases_file
from kvedit.cli import main
from kvedit.data.requests import EditRequest
from kvedit.editing import edit, targets
from kvedit.editing.registry import optimize_edit_targets
from kvedit.editing.target_store import reused_targets

REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
SETTINGS = dict(layers=(1, 2), max_steps=4, stats_source="self", stats_tokens=256)


def _update(lm, method, request=REQUEST, **settings):
    delta = edit(lm, request, method, **(SETTINGS | settings))
    try:
        return {name: delta.update(name).clone() for name in delta.names}
    finally:
        delta.revert(lm)


def _count_optimisations(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = targets._optimize_targets
    monkeypatch.setattr(
        targets,
        "_optimize_targets",
        lambda lm, requests, *a, **k: calls.append(len(requests)) or original(lm, requests, *a, **k),
    )
    return calls


def test_pmet_ablations_reuse_pmet_targets_from_disk_with_the_same_update(tmp_path, monkeypatch, kvedit_cache):
    lm = tiny("llama")
    fresh = _update(lm, "pmet-even-spread")
    calls = _count_optimisations(monkeypatch)
    with reused_targets(lm, tmp_path / "targets") as store:
        _update(lm, "pmet")
        assert calls == [1] and store.take_reused_s() == 0.0
    with reused_targets(lm, tmp_path / "targets") as store:  # a new store: read back from disk
        reused = _update(lm, "pmet-even-spread")
        assert calls == [1] and store.reused_s > 0  # the optimisation time it stands for
        _update(lm, "pmet-no-attn-delta")  # other sites: optimised anew
        assert calls == [1, 1]
    assert fresh.keys() == reused.keys()
    assert all(torch.allclose(fresh[k], reused[k], atol=1e-6) for k in fresh)
    assert len(list((tmp_path / "targets").glob("*/*.safetensors"))) == 2


def test_targets_are_not_reused_after_the_weights_change(tmp_path, monkeypatch, kvedit_cache):
    lm = tiny("llama")
    calls = _count_optimisations(monkeypatch)
    with reused_targets(lm, tmp_path / "targets"):
        _update(lm, "memit")
    kept = edit(lm, EditRequest("{} is the capital of", "berlin", target_new="spain"), "ft-values", max_steps=3)
    try:
        with reused_targets(lm, tmp_path / "targets"):
            _update(lm, "memit")
    finally:
        kept.revert(lm)
    assert calls == [1, 1]  # other weights, another folder
    assert len(list((tmp_path / "targets").iterdir())) == 2


def test_a_batch_serves_its_stored_requests_and_optimises_the_rest(tmp_path, monkeypatch, kvedit_cache):
    lm = tiny("llama")
    other = EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany")
    calls = _count_optimisations(monkeypatch)
    with reused_targets(lm) as store:
        alone = _update(lm, "memit")
        batch = _update(lm, "memit", [REQUEST, other])
        assert calls == [1, 1] and store.reused_s > 0  # only `other` was optimised
    fresh = _update(lm, "memit", [REQUEST, other])
    assert all(torch.allclose(fresh[k], batch[k], atol=1e-5) for k in fresh)
    assert not all(torch.allclose(alone[k], batch[k]) for k in alone)


@pytest.fixture
def facts(tmp_path):
    rows = [
        ("{} is located in the city of", "the eiffel tower", "rome", "paris"),
        ("{} is the capital of", "berlin", "spain", "germany"),
    ]
    return write_facts(tmp_path / "facts.json", rows)


def test_bench_reuse_targets_gives_the_same_scores_and_counts_the_optimisation_time(
    facts, tiny_folder, tmp_path, monkeypatch, kvedit_cache
):
    common = [
        "bench",
        "--model",
        str(tiny_folder),
        "--dataset",
        str(facts),
        "--stats",
        "self",
        "--stats-tokens",
        "256",
        "--layers",
        "2",
    ]
    assert main([*common, "--methods", "pmet-even-spread", "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--methods", "pmet", "--batch-size", "2", "--out", str(tmp_path / "plain")]) == 0
    calls = _count_optimisations(monkeypatch)
    assert (
        main([*common, "--methods", "pmet,pmet-even-spread", "--reuse-targets", "--out", str(tmp_path / "reused")]) == 0
    )
    assert (
        main([*common, "--methods", "pmet", "--batch-size", "2", "--reuse-targets", "--out", str(tmp_path / "reused")])
        == 0
    )
    assert (
        main([*common, "--methods", "pmet", "--sequential", "--reuse-targets", "--out", str(tmp_path / "reused")]) == 0
    )
    # pmet's two cases; its ablation and the batch of 2 (from the unedited weights) reused them; a sequential run
    # edits on top of its earlier edits, so it optimises its own
    assert calls == [1, 1, 1, 1], calls
    plain = {
        (r["run"].replace("pmet-even-spread", "pmet"), r["case_id"]): r
        for r in load_cases_file(tmp_path / "plain" / "cases.jsonl")
        if r["run"] != "unedited"
    }
    records = load_cases_file(tmp_path / "reused" / "cases.jsonl")
    for record in (r for r in records if r["run"] in ("pmet-even-spread@L2", "pmet@L2 x2")):
        assert record["targets_reused_s"] > 0 and record["time_s"] > record["targets_reused_s"]
        fresh = plain[(record["run"].replace("pmet-even-spread", "pmet"), record["case_id"])]
        for metric in (
            "efficacy_success",
            "paraphrase_success",
            "neighborhood_success",
            "efficacy_magnitude",
            "paraphrase_magnitude",
            "neighborhood_magnitude",
        ):
            assert record[metric] == pytest.approx(fresh[metric], abs=1e-5), metric
    assert not any("targets_reused_s" in r for r in records if r["run"] == "pmet@L2")
    assert "pmet@L2 x2 (2 of 2 cases)" in (tmp_path / "reused" / "table.md").read_text()


def test_targets_optimised_ahead_in_groups_give_each_edit_its_one_at_a_time_update(monkeypatch, kvedit_cache):
    lm = tiny("llama")
    others = [
        EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
        EditRequest("{} plays the", "miles davis", target_new="violin", target_true="trumpet"),
    ]
    requests = [REQUEST, *others]
    fresh = [_update(lm, "memit", r) for r in requests]
    calls = _count_optimisations(monkeypatch)
    with reused_targets(lm) as store:
        assert optimize_edit_targets(lm, [[r] for r in requests], "memit", **SETTINGS) == 3
        assert calls == [3]  # one grouped optimisation
        ahead = [_update(lm, "memit", r) for r in requests]
        assert calls == [3] and store.reused_s > 0
    for one, other in zip(fresh, ahead):
        assert all(torch.allclose(one[k], other[k], atol=1e-5) for k in one)


def test_rome_optimises_ahead_only_the_first_request_of_each_call(monkeypatch, kvedit_cache):
    lm = tiny("llama")
    pair = [REQUEST, EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany")]
    fresh = _update(lm, "rome", pair, layers=(2,))
    calls = _count_optimisations(monkeypatch)
    with reused_targets(lm):
        assert optimize_edit_targets(lm, [pair], "rome", **(SETTINGS | {"layers": (2,)})) == 1
        ahead = _update(lm, "rome", pair, layers=(2,))
    # the second request starts from weights the first changed: optimised in the edit, never from the store
    assert calls == [1, 1]
    assert all(torch.allclose(fresh[k], ahead[k], atol=1e-5) for k in fresh)


def test_optimising_ahead_needs_a_store_and_skips_editors_without_targets(kvedit_cache):
    lm = tiny("llama")
    with pytest.raises(RuntimeError, match="inside reused_targets"):
        optimize_edit_targets(lm, [[REQUEST]], "memit", **SETTINGS)
    assert optimize_edit_targets(lm, [[REQUEST]], "ft-keys") == 0
    with pytest.raises(BenchError, match="needs --reuse-targets"):
        BenchConfig(dataset="x.json", methods=("rome",), group_targets=True)


def test_bench_group_targets_keeps_the_scores_and_says_how_times_were_counted(
    facts, tiny_folder, tmp_path, monkeypatch, kvedit_cache
):
    common = ["bench", "--model", str(tiny_folder), "--dataset", str(facts), "--stats", "self"]
    common += ["--stats-tokens", "256", "--layers", "2", "--methods", "rome,ft-values"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    calls = _count_optimisations(monkeypatch)
    assert main([*common, "--group-targets", "--out", str(tmp_path / "grouped")]) == 0
    assert calls == [2]  # both cases' v* in one group, before the edits took them
    plain = {(r["run"], r["case_id"]): r for r in load_cases_file(tmp_path / "plain" / "cases.jsonl")}
    records = [r for r in load_cases_file(tmp_path / "grouped" / "cases.jsonl") if r["run"] == "rome@L2"]
    assert len(records) == 2
    for record in records:
        assert record["targets_grouped"] == targets.GROUP_SIZE and record["targets_reused_s"] > 0
        fresh = plain[(record["run"], record["case_id"])]
        for metric in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            assert record[metric] == pytest.approx(fresh[metric], abs=1e-5), metric
    table = (tmp_path / "grouped" / "table.md").read_text()
    assert "optimised ahead in groups of up to 16 requests" in table and "rome@L2 (2 of 2 cases)" in table
    assert "ft-values@L2 (" not in table
