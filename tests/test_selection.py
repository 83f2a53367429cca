"""The preset procedure: the tuning and report splits never overlap, and the chosen setting is the best-scoring one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny

import kvedit.bench.selection as selection
import kvedit.evaluation.known as known_module
from kvedit import EditRequest
from kvedit.data.loaders import load_requests

FIXTURE = Path(__file__).parent / "fixtures" / "counterfact_small.json"


def test_the_splits_are_known_cases_in_file_order_and_disjoint(monkeypatch):
    requests = load_requests(FIXTURE)
    flags = [i % 3 != 1 for i in range(len(requests))]  # the "unedited model knows" pattern
    knows = {id(r): ok for r, ok in zip(requests, flags)}
    monkeypatch.setattr(known_module, "known_filter", lambda lm, reqs: [knows[id(r)] for r in reqs])
    known = [r for r, ok in zip(requests, flags) if ok]
    split = selection.known_split(None, requests, n_tune=2, n_report=10)
    assert list(split.tune) == known[:2] and list(split.report) == known[2:12]
    assert not {id(r) for r in split.tune} & {id(r) for r in split.report}
    with pytest.raises(ValueError, match="known cases"):
        selection.known_split(None, requests, n_tune=len(known) + 1, n_report=0)


def test_first_known_reads_only_as_far_as_it_needs_and_keeps_file_order(monkeypatch):
    requests = load_requests(FIXTURE)
    flags = [i % 3 != 1 for i in range(len(requests))]
    knows = {id(r): ok for r, ok in zip(requests, flags)}
    scored: list[int] = []

    def fake_filter(lm, reqs):
        scored.append(len(reqs))
        return [knows[id(r)] for r in reqs]

    monkeypatch.setattr(known_module, "known_filter", fake_filter)
    known = [r for r, ok in zip(requests, flags) if ok]
    kept, read = known_module.first_known(None, requests, n=3, chunk=2, progress=False)
    assert kept == known[:3]
    assert read == 4 and scored == [2, 2]  # cases 0, 2 and 3 are known: two chunks of 2, no third
    everything, read_all = known_module.first_known(None, requests, chunk=4, progress=False)
    assert everything == known and read_all == len(requests)
    with pytest.raises(ValueError, match="chunk"):
        known_module.first_known(None, requests, chunk=0)


def test_grids_are_shared_by_memit_and_pmet_and_fit_the_model():
    lm = tiny("llama")  # 4 layers
    assert selection.default_grid(lm, "memit") == selection.default_grid(lm, "pmet")
    for method in ("memit", "pmet", "rome", "ft-keys"):
        grid = selection.default_grid(lm, method)
        assert grid and all(0 <= layer < lm.num_layers for s in grid for layer in s["layers"])
    ft = selection.default_grid(lm, "ft-values")  # fine-tuning: every layer at every learning rate
    assert {s["lr"] for s in ft} == set(selection.FT_LEARNING_RATES)
    assert len(ft) == len({s["layers"] for s in ft}) * len(selection.FT_LEARNING_RATES)


def test_delta_decay_is_a_second_stage_at_the_best_first_stage_setting(monkeypatch):
    lm = tiny("llama")
    for method in ("memit", "pmet", "rome"):
        first = selection.default_grid(lm, method)
        assert {s["weight_decay"] for s in first} == {0.5}
        scores = {selection.setting_key(method, s): float(i % 7) for i, s in enumerate(first)}
        rows = [{"method": method, **s, "score": scores[selection.setting_key(method, s)]} for s in first]
        assert selection.default_grid(lm, method, rows[:-1]) == first  # the first stage is not complete yet
        best = selection.best_setting(method, rows, first)
        second = selection.default_grid(lm, method, rows)[len(first) :]
        assert second == [{**{k: best[k] for k in first[0]}, "layers": tuple(best["layers"]), "weight_decay": 1e-3}]
    assert selection.default_grid(lm, "ft-keys", [{"method": "ft-keys", "score": 1.0}]) == selection.default_grid(
        lm, "ft-keys"
    )  # fine-tuning has no decay stage

    scored = []  # select() with the default grid runs the second stage after the first

    def fake_score(lm, requests, method, setting, log=None, **fixed):
        scored.append(dict(setting))
        return {"score": 90.0 if setting["layers"] == (2,) else 50.0 + setting["weight_decay"]}

    monkeypatch.setattr(selection, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(selection, "score_setting", fake_score)
    rows, chosen = selection.select(lm, [], ["rome"])
    first = selection.default_grid(lm, "rome")
    assert scored == first + [dict(layers=(2,), weight_decay=1e-3)]
    assert chosen["rome"] == dict(layers=(2,), weight_decay=0.5)  # a tie keeps the larger decay


def test_select_scores_every_setting_and_keeps_the_best_leaving_weights_alone(tmp_path, monkeypatch, kvedit_cache):
    lm = tiny("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    requests = [  # in the tiny vocabulary
        EditRequest(
            "{} is located in the city of",
            "the eiffel tower",
            target_new="rome",
            target_true="paris",
            paraphrase_prompts=("the famous landmark {} lies in",),
            neighborhood_prompts=("the louvre is located in the city of",),
            case_id=0,
        ),
        EditRequest(
            "{} is the capital of",
            "berlin",
            target_new="france",
            target_true="germany",
            paraphrase_prompts=("the capital city of {} is in",),
            neighborhood_prompts=("madrid is the capital of",),
            case_id=1,
        ),
    ]
    grids = {
        "ft-values": [dict(layers=(0,), lr=1e-6), dict(layers=(3,), lr=0.5)],
        "rome": [dict(layers=(1,), weight_decay=0.5)],
    }
    seen = []
    rows, chosen = selection.select(
        lm,
        requests,
        ["ft-values", "rome"],
        grids,
        on_result=seen.append,
        max_steps=3,
        stats_source="self",
        stats_tokens=256,
    )
    assert rows == seen and [r["method"] for r in rows] == ["ft-values", "ft-values", "rome"]
    ft = [r for r in rows if r["method"] == "ft-values"]
    best = max(ft, key=lambda r: r["score"])
    assert chosen["ft-values"] == {"layers": best["layers"], "lr": best["lr"]}
    assert ft[1]["efficacy_success"] >= ft[0]["efficacy_success"]  # lr 0.5 moves the target, 1e-6 barely does
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_a_lambda_sweep_reuses_the_targets_and_gives_the_same_updates(tmp_path, monkeypatch, kvedit_cache):
    from kvedit.editing import edit, targets
    from kvedit.editing.target_store import reused_targets

    lm = tiny("llama")
    request = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")
    settings = dict(layers=(1, 2), max_steps=4, stats_source="self", stats_tokens=256)

    def updates(lam: float) -> dict[str, torch.Tensor]:
        delta = edit(lm, request, "memit", mom2_update_weight=lam, **settings)
        try:
            return {name: delta.update(name).clone() for name in delta.names}
        finally:
            delta.revert(lm)

    fresh = {lam: updates(lam) for lam in (100.0, 5000.0)}
    calls = []
    original = targets._optimize_targets
    monkeypatch.setattr(targets, "_optimize_targets", lambda *a, **k: calls.append(1) or original(*a, **k))
    with reused_targets(lm):
        reused = {lam: updates(lam) for lam in (100.0, 5000.0)}
        with pytest.raises(RuntimeError, match="already active"):
            with reused_targets(lm):
                pass
    assert len(calls) == 1  # the second λ solved with the first one's targets
    assert "reused_targets" not in lm.memo
    for lam in fresh:
        assert fresh[lam].keys() == reused[lam].keys()
        assert all(torch.allclose(fresh[lam][k], reused[lam][k], atol=1e-6) for k in fresh[lam])
    assert not torch.allclose(*[next(iter(fresh[lam].values())) for lam in fresh])  # λ does change the update


def test_a_killed_sweep_resumes_inside_a_setting_from_its_case_log(tmp_path, monkeypatch, kvedit_cache):
    lm = tiny("llama")
    requests = load_requests(FIXTURE)[:3]
    setting = dict(layers=(1,))
    log = selection.CaseLog(tmp_path / "cases.jsonl")
    full = selection.score_setting(lm, requests, "ft-values", setting, log, max_steps=2)
    key = selection.setting_key("ft-values", setting)
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # a kill after the first case, mid-way through writing the second
    (tmp_path / "cases.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    resumed_log = selection.CaseLog(tmp_path / "cases.jsonl")
    assert list(resumed_log.done(key)) == [requests[0].case_id]
    edited = []
    original = selection.edit
    monkeypatch.setattr(selection, "edit", lambda lm, r, *a, **k: edited.append(r.case_id) or original(lm, r, *a, **k))
    resumed = selection.score_setting(lm, requests, "ft-values", setting, resumed_log, max_steps=2)
    assert edited == [r.case_id for r in requests[1:]]  # the logged case is not edited again
    assert {k: resumed[k] for k in selection.METRICS} == {k: full[k] for k in selection.METRICS}
    assert sorted(selection.CaseLog(tmp_path / "cases.jsonl").done(key)) == sorted(r.case_id for r in requests)


def test_a_model_with_chosen_presets_gets_them_ahead_of_its_family():
    from kvedit.editing.memit import MEMIT_PRESETS
    from kvedit.editing.presets import default_preset
    from kvedit.models.lm import LM

    lm = tiny("llama")
    assert default_preset(lm, MEMIT_PRESETS) == "llama"
    smol = LM.wrap(lm.model, lm.tokenizer, name="SmolLM2-135M-Instruct")
    assert default_preset(smol, MEMIT_PRESETS) == "smollm2"


def test_a_base_preset_reaches_the_methods_that_have_that_row_only(monkeypatch):
    lm = tiny("llama")
    given = {}

    def record(lm, requests, method, setting, log=None, **fixed):
        given[method] = fixed
        return {"score": 1.0}

    monkeypatch.setattr(selection, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(selection, "score_setting", record)
    grids = {"ft-keys": [dict(layers=(1,))], "rome": [dict(layers=(1,))]}
    selection.select(lm, [], ["ft-keys", "rome"], grids, base_preset="smollm2")
    assert given["rome"]["preset"] == "smollm2" and "preset" not in given["ft-keys"]
    rome = selection.get_method("rome").make_hparams(lm, **given["rome"], layers=(1,))
    assert rome.mom2_adjustment and rome.stats_tokens == 20_000  # the SmolLM2 row's, not the Llama family's


def test_a_tie_in_score_goes_to_the_smaller_edit_whatever_order_the_rows_came_in():
    lm = tiny("llama")
    grid = selection.default_grid(lm, "memit")
    window = grid[0]["layers"]
    lambdas = [s["mom2_update_weight"] for s in grid if s["layers"] == window and s["weight_decay"] == 0.5]
    assert lambdas == sorted(lambdas, reverse=True)  # the largest λ (smallest update) first
    rows = [
        {
            "method": "memit",
            "layers": list(window),
            "mom2_update_weight": lam,
            "weight_decay": 0.5,
            "score": 80.0 if lam <= 500 else 70.0,
        }
        for lam in (50.0, 150.0, 500.0, 1500.0)
    ]
    best = selection.best_setting("memit", rows, grid)
    assert best["mom2_update_weight"] == 500.0  # tied with 150 and 50, and listed before them
    assert selection.best_setting("memit", rows[::-1], grid) == best
    with pytest.raises(ValueError, match="no rows"):
        selection.best_setting("pmet", rows, grid)


def test_the_sweep_table_shows_each_layer_choice_by_lambda_with_the_best_in_bold():
    grid = [
        dict(layers=w, mom2_update_weight=lam, weight_decay=wd)
        for w in ((1, 2), (2, 3))
        for lam in (100.0, 10.0)
        for wd in (0.5, 1e-3)
    ]
    scores = [50.0, 50.0, 70.0, 72.0, 60.0, 60.0, 65.0, 65.0]
    rows = [{"method": "memit", **s, "score": v} for s, v in zip(grid, scores)]
    table = selection.sweep_table("memit", rows, grid)
    assert table.splitlines()[:4] == [
        "| layers | λ 100 | λ 10 |",
        "|---|---:|---:|",
        "| 1–2 | 50.0 | **72.0** |",
        "| 2–3 | 60.0 | 65.0 |",
    ]
    assert "changed the Score in 1 of 4 cells" in table
    partial = selection.sweep_table("memit", rows[:5], grid)  # unfinished: no choice, – where not run
    assert "**" not in partial and "| 2–3 | 60.0 | – |" in partial
    ft = selection.sweep_table(
        "ft-keys", [{"method": "ft-keys", "layers": [0], "score": 40.0}], [dict(layers=(0,)), dict(layers=(3,))]
    )
    assert ft.splitlines()[2:] == ["| 0 | 40.0 |", "| 3 | – |"]


def test_fine_tuning_takes_the_layer_and_lr_chosen_for_the_model_unless_told_otherwise(monkeypatch):
    from kvedit.editing import presets
    from kvedit.editing.registry import get_method
    from kvedit.models.lm import LM

    lm = tiny("llama")
    gemma_named = LM.wrap(lm.model, lm.tokenizer, name="gemma-3-270m-q4_k_m")
    monkeypatch.setattr(presets, "FT_MODEL_PRESETS", {"values": {"gemma3-270m": {"layers": (0,), "lr": 1e-4}}})
    values, keys = get_method("ft-values"), get_method("ft-keys")
    assert values.make_hparams(gemma_named).validate(gemma_named).layers == (0,)
    assert values.make_hparams(gemma_named).lr == 1e-4
    assert values.make_hparams(gemma_named, lr=1e-3, layers=None).lr == 1e-3  # the caller's setting wins
    assert (
        values.make_hparams(gemma_named, preset="ft-l").lr == 5e-4
        and values.make_hparams(gemma_named, preset="qiu2024").layers == ()
    )  # a named preset: the family's layer
    assert keys.make_hparams(gemma_named).lr == values.make_hparams(lm).lr == 2e-3  # no row: the default
    from kvedit.editing.registry import chosen_for_model

    assert chosen_for_model(gemma_named, "ft-values") and not chosen_for_model(gemma_named, "ft-keys")
    smol = LM.wrap(lm.model, lm.tokenizer, name="SmolLM2-135M-Instruct")
    assert chosen_for_model(smol, "rome") and chosen_for_model(smol, "pmet-even-spread")
    assert not chosen_for_model(lm, "memit")  # a tiny Llama takes its family's row


def test_gemma3_takes_the_closed_form_presets_chosen_for_it():
    """The name the packaged Gemma-3-270M loads under selects its own rows, not the Llama family's."""
    from kvedit.editing.registry import chosen_for_model, get_method
    from kvedit.models.lm import LM

    lm = tiny("gemma3_text")
    gemma = LM.wrap(lm.model, lm.tokenizer, name="gemma-3-270m-q4_k_m")
    one_at_a_time = [
        "ft-keys",
        "ft-values",
        "rome",
        "memit",
        "pmet",
        "pmet-no-attn-delta",
        "pmet-update-attn",
        "pmet-even-spread",
    ]
    assert [m for m in one_at_a_time if not chosen_for_model(gemma, m)] == []
    assert not chosen_for_model(lm, "pmet")  # the tiny model's name selects no row
    memit, pmet = get_method("memit").make_hparams(gemma), get_method("pmet").make_hparams(gemma)
    assert (memit.layers, memit.mom2_update_weight) == ((1, 2, 3, 4, 5), 1500.0)
    assert (pmet.layers, pmet.mom2_update_weight, pmet.weight_decay) == ((2, 3, 4, 5, 6), 1500.0, 1e-3)
    assert get_method("pmet-update-attn").make_hparams(gemma).layers == pmet.layers  # ablations share the row
    assert get_method("rome").make_hparams(gemma).layers == (2,)


@pytest.mark.parametrize("folder, row", [("select-smollm2", "smollm2"), ("select-gemma3", "gemma3-270m")])
def test_preset_tables_hold_what_the_selection_chose(folder, row):
    """Each model's preset rows equal the chosen.json its selection wrote (results/ in this repository), so a
    table run on the model's defaults runs the settings docs/presets.md reports."""
    from kvedit.editing.kn import KN_PRESETS
    from kvedit.editing.memit import MEMIT_PRESETS
    from kvedit.editing.pmet import PMET_PRESETS
    from kvedit.editing.presets import FT_MODEL_PRESETS
    from kvedit.editing.rome import ROME_PRESETS
    from kvedit.editing.tpatcher import TPATCHER_PRESETS

    chosen = json.loads((Path(__file__).parents[1] / "results" / folder / "chosen.json").read_text())
    tables = {"rome": ROME_PRESETS, "memit": MEMIT_PRESETS, "pmet": PMET_PRESETS}
    located = {"kn": KN_PRESETS, "t-patcher": TPATCHER_PRESETS}  # chosen in a later selection, model by model
    assert {"ft-keys", "ft-values", *tables} <= set(chosen) <= {"ft-keys", "ft-values", *tables, *located}
    for method, table in located.items():  # a model has its own row exactly when its selection chose one
        assert (row in table) == (method in chosen), method
    tables |= located
    for method, settings in chosen.items():
        preset = FT_MODEL_PRESETS[method.removeprefix("ft-")][row] if method.startswith("ft-") else tables[method][row]
        assert {k: list(v) if k == "layers" else v for k, v in preset.items() if k in settings} == settings, method


def test_kn_and_tpatcher_grids_vary_what_the_references_vary_and_fit_the_model():
    lm = tiny("llama")  # 4 layers
    kn, patcher = selection.default_grid(lm, "kn"), selection.default_grid(lm, "t-patcher")
    assert 1 < len(kn) <= 12 and 1 < len(patcher) <= 12
    assert all(s["layers"] == (0, 1, 2, 3) for s in kn)  # every layer searched, as EasyEdit does
    assert {s["threshold"] for s in kn} == set(selection.KN_THRESHOLDS)
    assert {(s["max_steps"], s["edit_factor"]) for s in kn} == {
        (m, f) for m in selection.KN_STEPS for f in selection.KN_EDIT_FACTORS
    }
    assert kn[0]["threshold"] == max(selection.KN_THRESHOLDS)  # fewest neurons (the smallest edit) first
    assert all(s["layers"] == (3,) for s in patcher)  # the last FFN layer, as the reference
    assert patcher[0] == dict(layers=(3,), memory_weight=10.0, max_neurons=1, lr=min(selection.TPATCHER_LEARNING_RATES))
    for method, grid in (("kn", kn), ("t-patcher", patcher)):
        assert len({selection.setting_key(method, s) for s in grid}) == len(grid)
        assert selection.default_grid(lm, method, [{"method": method, **grid[0], "score": 1.0}]) == grid  # one stage
        hparams = selection.get_method(method).make_hparams(lm, **grid[-1]).validate(lm)
        assert all(getattr(hparams, k) == v for k, v in grid[-1].items())
    rows = [{"method": "kn", **s, "score": 50.0 + (s["max_steps"] == 20)} for s in kn]
    table = selection.sweep_table("kn", rows, kn)
    assert table.splitlines()[0] == "| layers | threshold 0.3 | threshold 0.2 | threshold 0.1 |"
    assert "the other settings (max_steps, edit_factor) changed the Score" in table


def test_select_presets_runs_kn_and_tpatcher_end_to_end(tmp_path, monkeypatch, tiny_folder, kvedit_cache):
    """benchmarks/select_presets.py with --methods kn,t-patcher on a tiny model over 2 tuning cases (each grid cut to
    two settings, T-Patcher to 3 steps) writes their grid rows and chosen.json rows, and resumes from them."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "select_presets", Path(__file__).parents[1] / "benchmarks" / "select_presets.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    records = [
        {
            "case_id": 0,
            "prompt": "{} is located in the city of",
            "subject": "the eiffel tower",
            "target_new": "rome",
            "target_true": "paris",
            "paraphrase_prompts": ["the famous landmark {} lies in"],
            "neighborhood_prompts": ["the louvre is located in the city of"],
        },
        {
            "case_id": 1,
            "prompt": "{} is the capital of",
            "subject": "berlin",
            "target_new": "france",
            "target_true": "germany",
            "paraphrase_prompts": ["the capital city of {} is in"],
            "neighborhood_prompts": ["madrid is the capital of"],
        },
    ]
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(records))
    monkeypatch.setattr(known_module, "known_filter", lambda lm, reqs: [True] * len(reqs))
    real = selection.default_grid

    def small(lm, method, rows=()):
        extra = dict(max_steps=3, stats_source="self", stats_tokens=256) if method == "t-patcher" else {}
        return [{**s, **extra} for s in real(lm, method, rows)[:2]]

    monkeypatch.setattr(script, "default_grid", small)
    out = tmp_path / "select"
    argv = [
        "select_presets.py",
        "--out",
        str(out),
        "--model",
        str(tiny_folder),
        "--dataset",
        str(data),
        "--n-tune",
        "2",
        "--n-report",
        "0",
        "--methods",
        "kn,t-patcher",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    rows = [json.loads(line) for line in (out / "grid.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["kn", "kn", "t-patcher", "t-patcher"]
    assert all(r["cases"] == 2 for r in rows)
    chosen = json.loads((out / "chosen.json").read_text())
    lm = script.load_model(str(tiny_folder))
    for method in ("kn", "t-patcher"):
        grid = small(lm, method)
        best = selection.best_setting(method, rows, grid)
        assert chosen[method] == {**selection.setting_of(best)} and set(chosen[method]) == set(grid[0])
    assert "threshold 0.3" in (out / "grid.md").read_text()
    cases = (out / "cases.jsonl").read_text()
    script.main()  # everything is done: nothing is edited again, the same choice
    assert (out / "cases.jsonl").read_text() == cases and json.loads((out / "chosen.json").read_text()) == chosen
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "kn", "--tables-only"])
    script.main()  # the tables of another --methods still hold every method the folder has
    assert json.loads((out / "chosen.json").read_text()) == chosen
    assert "| t-patcher" in (out / "grid.md").read_text()
    monkeypatch.setattr(sys, "argv", [*argv, "--tables-only", "--where", "nonsense=1"])
    with pytest.raises(SystemExit, match="has nonsense"):
        script.main()
    monkeypatch.setattr(sys, "argv", [*argv, "--tables-only", "--where", "lr=0.01"])
    script.main()  # a reduced grid (T-Patcher's second setting only; KN has no lr): its choice, said in grid.md
    second = next(r for r in rows if r["method"] == "t-patcher" and r["lr"] == 0.01)
    reduced = json.loads((out / "chosen.json").read_text())
    assert reduced["kn"] == chosen["kn"] and reduced["t-patcher"] == selection.setting_of(second)
    assert "Grid restricted to lr = 0.01" in (out / "grid.md").read_text()
    monkeypatch.setattr(sys, "argv", [*argv, "--tables-only", "--where", "lr=0.003"])
    with pytest.raises(SystemExit, match="differs from the restriction"):
        script.main()


def test_seed_tables_script_refuses_editors_without_presets_chosen_for_the_model(tmp_path, tiny_folder):
    """benchmarks/seed_tables.sh runs a table only on presets chosen for the model: on a tiny model (no rows of
    its own) it stops before editing and names the editors of METHODS."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_tables.sh"
    bin_dir = Path(sys.executable).parent  # kvedit's interpreter is not on PATH: the script finds it beside kvedit
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != bin_dir)
    env = os.environ | {
        "PATH": path,
        "KVEDIT": str(bin_dir / "kvedit"),
        "METHODS": "kn,t-patcher",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(script), str(tiny_folder), "zsre", str(tmp_path / "tables")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "has no presets of its own for kn, t-patcher" in done.stderr
    assert not (tmp_path / "tables" / "zsre" / "cases.jsonl").exists()
