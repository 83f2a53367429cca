"""`kvedit bench` on the propagation sets (issue 32): each of the four formats through bench, report and compare;
per-case records against metrics computed by hand; the known rule of each set; resume; MQuAKE's edits applied in
one call and the weights restored bit for bit after every case; three real records per set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run, same, snapshot, tiny
from test_multihop import _hand_greedy
from test_propagation import (
    CF_RECORD,
    KNOWEDIT_RECORD,
    ZSRE_RECORD,
    _hand_accuracy,
    _hand_nll,
    _mquake_record,
    shared_file,
    tiny_qa_lm,
)

import kvedit.bench.runner as batch_runner_module
from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import BenchError, load_cases_file
from kvedit.bench.harness import Bench
from kvedit.cli.runs import SUITE_NAMES
from kvedit.data.propagation import load_propagation
from kvedit.editing.registry import edit
from kvedit.evaluation.multihop import answer_matches, known_multihop, question_prompt
from kvedit.evaluation.portability import known_by_preference
from kvedit.evaluation.suites import SUITES

FT = {"max_steps": 20}  # enough for FT-keys to land its edit on the tiny model (and move the probes below)
#: a KnowEdit record whose subject-aliasing probe asks the rephrased question: FT-keys carries the edit to it
KNOWEDIT_CARRIED = KNOWEDIT_RECORD | {
    "portability": {
        "Reasoning": KNOWEDIT_RECORD["portability"]["Reasoning"],
        "Subject_Aliasing": [{"prompt": "where is big ben?", "ground_truth": "berlin"}],
    }
}
#: per format: the record file's records (3 each) and the metric that says whether the edit propagated
RECORDS = {
    "counterfact-portability": [CF_RECORD | {"case_id": i} for i in range(3)],
    "zsre-portability": [ZSRE_RECORD] * 3,
    "knowedit": [KNOWEDIT_RECORD, KNOWEDIT_CARRIED, KNOWEDIT_RECORD],
    "mquake": [_mquake_record(i) for i in (1, 2, 3)],
}
PROPAGATES = {
    "counterfact-portability": "portability_accuracy",
    "zsre-portability": "portability_accuracy",
    "knowedit": "portability_accuracy",
    "mquake": "multihop_accuracy",
}


def _write(folder: Path, fmt: str) -> Path:
    path = folder / f"{fmt}.json"
    path.write_text(json.dumps(RECORDS[fmt]))
    return path


def _qa_lm():
    """The tiny Llama with a vocabulary holding every word of the fixture records (no [UNK])."""
    return tiny_qa_lm([json.dumps(RECORDS)])


def test_the_cli_offers_every_suite():
    assert sorted(SUITE_NAMES) == sorted(SUITES)


@pytest.fixture(scope="module")
def cli_folders(tmp_path_factory, module_cache):
    """`kvedit bench` through the CLI on each format (FT on keys and on values, a tiny model folder)."""
    root = tmp_path_factory.mktemp("cli")
    lm = tiny("llama")
    model = root / "tiny-llama"
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    folders = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVEDIT_CACHE", str(module_cache))
        for fmt in RECORDS:
            out = root / fmt
            code, printed, err = run(
                "bench",
                "--model",
                model,
                "--dataset",
                _write(root, fmt),
                "--methods",
                "ft-keys,ft-values",
                "--out",
                out,
            )
            assert code == 0, err
            folders[fmt] = (out, printed)
    return folders


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_set_runs_through_bench_and_report(cli_folders, fmt):
    out, printed = cli_folders[fmt]
    summary = json.loads((out / "summary.json").read_text())
    suite = SUITES[fmt]
    assert (
        summary["suite"] == fmt
        and summary["complete"]
        and list(summary["runs"]) == ["unedited", "ft-keys", "ft-values"]
    )
    key = PROPAGATES[fmt]
    for run_summary in summary["runs"].values():  # the unedited row has the same metrics: the base rates
        assert run_summary["n"] == 3 and run_summary["metrics"][key]["count"] == 3
        assert run_summary["metrics"][key]["ci"] is not None
    paired = [c for c in summary["comparisons"] if (c["a"], c["b"], c["metric"]) == ("ft-keys", "ft-values", key)]
    assert len(paired) == 1 and paired[0]["count"] == 3
    title = suite.metric_titles()[key]
    table = (out / "table.md").read_text()
    assert f" {title} " in table.splitlines()[2] and table in printed
    assert run("report", out)[0] == 0
    report = (out / "report.md").read_text()
    assert f"| ft-keys | ft-values | {title} |" in report  # keys − values, paired, on the propagation metric
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_puts_the_four_sets_side_by_side(cli_folders, tmp_path):
    folders = [cli_folders[fmt][0] for fmt in RECORDS]
    out = tmp_path / "cmp"
    code, _, err = run("compare", *folders, "--out", out, "--pairs", "ft-keys:ft-values")
    assert code == 0, err
    text = (out / "compare.md").read_text()
    assert "| ft-keys − ft-values | Portability |" in text and "| ft-keys − ft-values | Multi-hop |" in text
    columns = json.loads((out / "compare.json").read_text())["columns"]
    knowedit = json.loads((folders[2] / "summary.json").read_text())
    stored = next(
        c
        for c in knowedit["comparisons"]
        if (c["a"], c["b"], c["metric"]) == ("ft-keys", "ft-values", "portability_accuracy")
    )
    label = next(label for label in columns if "KnowEdit" in label)
    assert columns[label]["ft-keys|ft-values|Portability"]["mean_difference"] == stored["mean_difference"]
    assert "MQuAKE: Edit-wise / Single-hop / Multi-hop / Multi-hop prob." in text


def test_report_and_compare_load_neither_torch_nor_transformers(cli_folders, tmp_path):
    """They read summaries only: a report answers in seconds, not after torch's and transformers' imports."""
    import subprocess
    import sys

    folders = [str(cli_folders[fmt][0]) for fmt in ("knowedit", "mquake")]
    code = (
        "import sys; from kvedit.cli import main\n"
        f"assert main(['report', {folders[0]!r}]) == 0\n"
        f"assert main(['compare', *{folders!r}, '--out', {str(tmp_path / 'cmp')!r}, '--pairs', 'ft-keys:ft-values']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "cmp" / "compare.md").is_file()


# ---------------------------------------------------------------- records against hand computation


def _records(out: Path, run_name: str) -> dict:
    return {r["case_id"]: r for r in load_cases_file(out / "cases.jsonl") if r["run"] == run_name}


@pytest.mark.parametrize("fmt", ["counterfact-portability", "knowedit"])
def test_portability_records_match_hand_computation(fmt, tmp_path):
    lm = _qa_lm()
    out = tmp_path / "run"
    summary = Bench(
        lm,
        BenchConfig(dataset=str(_write(tmp_path, fmt)), methods=("ft-keys", "ft-values"), extra=FT),
        out,
        progress=False,
    ).run()
    cases = load_propagation(tmp_path / f"{fmt}.json", fmt)
    before = {}
    for run_name in ("unedited", "ft-keys", "ft-values"):
        records = _records(out, run_name)
        for case in cases:
            delta = None if run_name == "unedited" else edit(lm, [case.request], run_name, **FT)
            try:
                hand = {p: _hand_accuracy(lm, p.prompt, p.answer) for p in (*case.portability, *case.locality)}
            finally:
                if delta is not None:
                    delta.revert(lm)
            record = records[case.case_id]
            portable = [hand[p][0] for p in case.portability]
            assert record["portability_accuracy"] == pytest.approx(sum(portable) / len(portable), abs=1e-6)
            for kind in {p.kind for p in case.portability}:
                values = [hand[p][0] for p in case.portability if p.kind == kind]
                assert record[f"{kind}_accuracy"] == pytest.approx(sum(values) / len(values), abs=1e-6)
            if case.locality:  # KnowEdit: relation specificity, and EasyEdit's locality against the unedited ids
                ids = [hand[p][1] for p in case.locality]
                if run_name == "unedited":
                    before[case.case_id] = ids
                    assert record["relation_specificity_argmax"] == ids
                unchanged = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(ids, before[case.case_id])]
                assert record["relation_specificity_unchanged"] == pytest.approx(sum(unchanged) / len(unchanged))
                rel = [hand[p][0] for p in case.locality]
                assert record["relation_specificity_accuracy"] == pytest.approx(sum(rel) / len(rel), abs=1e-6)
        mean = 100 * sum(r["portability_accuracy"] for r in records.values()) / len(records)
        assert summary["runs"][run_name]["metrics"]["portability_accuracy"]["mean"] == pytest.approx(mean)
    keys, values = _records(out, "ft-keys"), _records(out, "ft-values")
    if fmt == "knowedit":  # the values are not all alike: the edit moved some probes and not others
        assert (
            keys[1]["subject_aliasing_accuracy"] == 1.0
            and _records(out, "unedited")[1]["subject_aliasing_accuracy"] == 0.0
        )
        assert min(r["relation_specificity_unchanged"] for r in keys.values()) < 1.0
    difference = 100 * sum(keys[c]["portability_accuracy"] - values[c]["portability_accuracy"] for c in keys) / 3
    paired = next(
        c
        for c in summary["comparisons"]
        if (c["a"], c["b"], c["metric"]) == ("ft-keys", "ft-values", "portability_accuracy")
    )
    assert paired["mean_difference"] == pytest.approx(difference)
    if fmt == "counterfact-portability":  # fluency on the generation prompts, as CounterFact's
        assert all(r["fluency"] > 0 for r in keys.values())


def test_mquake_edits_a_case_in_one_call_restores_weights_and_scores_by_hand(tmp_path, monkeypatch):
    lm = _qa_lm()
    pristine = snapshot(lm)
    calls: list[list] = []
    real = batch_runner_module.edit

    def checked(lm_, requests, method, **kw):
        assert same(snapshot(lm_), pristine)  # every earlier case was reverted bit for bit
        calls.append([r.case_id for r in requests])
        delta = real(lm_, requests, method, **kw)
        assert not same(snapshot(lm_), pristine)  # the edit changed the weights
        return delta

    monkeypatch.setattr(batch_runner_module, "edit", checked)
    out = tmp_path / "mq"
    Bench(
        lm, BenchConfig(dataset=str(_write(tmp_path, "mquake")), methods=("ft-keys",), extra=FT), out, progress=False
    ).run()
    assert same(snapshot(lm), pristine)
    assert calls == [[f"{i}/0", f"{i}/1"] for i in (1, 2, 3)]  # all of a case's edits, one call per case
    monkeypatch.setattr(batch_runner_module, "edit", real)

    cases = load_propagation(tmp_path / "mquake.json", "mquake")
    records = _records(out, "ft-keys")
    assert all(r["edits"] == 2 and r["batch_size"] == 1 for r in records.values())
    case = cases[0]
    delta = edit(lm, list(case.requests), "ft-keys", **FT)
    try:
        answers = [_hand_greedy(lm, question_prompt(q), 16) for q in case.questions]
        hops = [_hand_greedy(lm, question_prompt(q), 16) for q in case.edit_questions]
        efficacy = [
            _hand_nll(lm, r.rewrite_prompt, r.target_new) < _hand_nll(lm, r.rewrite_prompt, r.target_true)
            for r in case.requests
        ]
        nll = [
            (_hand_nll(lm, question_prompt(q), case.new_answers[0]), _hand_nll(lm, question_prompt(q), case.answers[0]))
            for q in case.questions
        ]
    finally:
        delta.revert(lm)
    assert same(snapshot(lm), pristine)
    record = records[case.case_id]
    assert record["multihop_answers"] == answers and record["single_hop_answers"] == hops
    assert record["multihop_accuracy"] == float(any(answer_matches(a, case.new_answers) for a in answers))
    assert record["single_hop_accuracy"] == pytest.approx(
        sum(answer_matches(a, acc) for a, acc in zip(hops, case.edit_answers)) / len(hops)
    )
    assert record["efficacy_success"] == pytest.approx(sum(efficacy) / len(efficacy))
    assert record["multihop_prob_accuracy"] == pytest.approx(sum(n < o for n, o in nll) / len(nll))
    assert record["multihop_nll_margin"] == pytest.approx(sum(o - n for n, o in nll) / len(nll), abs=1e-4)


# ---------------------------------------------------------------- known, resume, refusals


def test_known_only_keeps_what_each_sets_rule_keeps(tmp_path, monkeypatch):
    import kvedit.evaluation.multihop as multihop_module
    import kvedit.evaluation.portability as portability_module

    lm = _qa_lm()
    for fmt, rule in (
        ("knowedit", known_by_preference),
        ("zsre-portability", known_by_preference),
        ("mquake", known_multihop),
    ):
        path = _write(tmp_path, fmt)
        cases = load_propagation(path, fmt)
        kept = [c.case_id for c, keep in zip(cases, rule(lm, cases)) if keep]
        bench = Bench(
            lm, BenchConfig(dataset=str(path), methods=("ft-keys",), known_only=True), tmp_path / fmt, progress=False
        )
        assert [c.case_id for c in bench.cases] == kept
        assert json.loads((tmp_path / fmt / "known.json").read_text())["kept_case_ids"] == kept
        assert bench.filter_info["known_rule"] == SUITES[fmt].known_rule
    # the suite's rule decides (a tiny random model's verdicts are all alike: say which cases it knows)
    monkeypatch.setattr(portability_module, "known_by_preference", lambda lm_, cases: [True, False, True])
    monkeypatch.setattr(multihop_module, "known_multihop", lambda lm_, cases: [False, True, False])
    for fmt, kept in (("knowedit", [0, 2]), ("mquake", [2])):
        bench = Bench(
            lm,
            BenchConfig(dataset=str(_write(tmp_path, fmt)), methods=("ft-keys",), known_only=True),
            tmp_path / f"{fmt}-patched",
            progress=False,
        )
        assert [c.case_id for c in bench.cases] == kept and bench.filter_info["known_kept"] == len(kept)


def test_a_resumed_run_does_not_redo_finished_cases(tmp_path, monkeypatch):
    lm = _qa_lm()
    path = _write(tmp_path, "knowedit")
    out = tmp_path / "run"
    config = BenchConfig(dataset=str(path), methods=("ft-keys",), n=2, extra=FT)
    first = Bench(lm, config, out, progress=False).run()
    calls = []
    real = batch_runner_module.edit

    def counting(lm_, requests, method, **kw):
        calls.append([r.case_id for r in requests])
        return real(lm_, requests, method, **kw)

    monkeypatch.setattr(batch_runner_module, "edit", counting)
    again = Bench(lm, config, out, progress=False).run()
    assert calls == [] and again["runs"] == first["runs"]
    Bench(lm, BenchConfig(dataset=str(path), methods=("ft-keys",), n=3, extra=FT), out, progress=False).run()
    assert calls == [[2]]  # only the new case
    unedited = [r for r in load_cases_file(out / "cases.jsonl") if r["run"] == "unedited"]
    assert sorted(r["case_id"] for r in unedited) == [0, 1, 2]


def test_a_portability_file_can_be_scored_as_plain_counterfact_and_sequential_is_refused(tmp_path):
    lm = tiny("llama")
    path = _write(tmp_path, "counterfact-portability")
    summary = Bench(
        lm,
        BenchConfig(dataset=str(path), methods=("ft-keys",), suite="counterfact", extra=FT),
        tmp_path / "cf",
        progress=False,
    ).run()
    assert summary["suite"] == "counterfact" and "portability_accuracy" not in summary["runs"]["ft-keys"]["metrics"]
    with pytest.raises(BenchError, match="--sequential"):
        Bench(lm, BenchConfig(dataset=str(path), methods=("ft-keys",), sequential=True), tmp_path / "seq")


def test_the_folder_is_checked_once_and_before_the_model_loads(tmp_path, tiny_folder, monkeypatch):
    import kvedit.bench.harness as harness
    import kvedit.cli.runs as runs

    checks = []
    real = harness.check_bench_folder
    monkeypatch.setattr(harness, "check_bench_folder", lambda out: checks.append(out) or real(out))
    path = _write(tmp_path, "zsre-portability")
    assert (
        run(
            "bench",
            "--model",
            tiny_folder,
            "--dataset",
            path,
            "--methods",
            "ft-keys",
            "--n",
            "1",
            "--out",
            tmp_path / "ok",
        )[0]
        == 0
    )
    assert len(checks) == 1
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(runs, "load", lambda args: pytest.fail("the model loaded before --out was checked"))
    code, _, err = run("bench", "--dataset", path, "--out", tmp_path / "file")
    assert code == 2 and "is an existing file" in err


# ---------------------------------------------------------------- three real records per set


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_three_real_records_per_set(fmt, tmp_path):
    records = json.loads(shared_file(fmt).read_text())[:3]
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps(records))
    lm = tiny_qa_lm([json.dumps(records)])
    pristine = snapshot(lm)
    summary = Bench(
        lm, BenchConfig(dataset=str(path), methods=("ft-keys",), extra=FT), tmp_path / "run", progress=False
    ).run()
    assert same(snapshot(lm), pristine)
    cases = load_propagation(path, fmt, skip_invalid=True)
    key = PROPAGATES[fmt]
    assert summary["runs"]["ft-keys"]["metrics"][key]["count"] == len(cases) >= 2
    unedited = _records(tmp_path / "run", "unedited")
    scored = SUITES[fmt].case_metrics(lm, cases)  # the unedited model, scored directly
    for case, direct in zip(cases, scored):
        assert unedited[case.case_id][key] == pytest.approx(direct[key])
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in lm.model.parameters())


def test_the_propagation_tables_script_runs_its_sets_reports_and_compares(tmp_path, tiny_folder, kvedit_cache):
    """benchmarks/propagation_tables.sh as a user runs it, on two of the shared sets, 2 cases each, a tiny model."""
    import os
    import subprocess
    import sys

    for fmt in ("zsre-portability", "knowedit"):
        shared_file(fmt)  # skipped (a failure under CI) without the shared sets the script reads
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "propagation_tables.sh"
    out = tmp_path / "tables"
    env = os.environ | {
        "KVEDIT": str(Path(sys.executable).parent / "kvedit"),
        "SETS": "zsre knowedit",
        "METHODS": "ft-keys,ft-values",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(script), str(tiny_folder), str(out), "2", "--", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("zsre", "knowedit"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["complete"] and list(summary["runs"]) == ["unedited", "ft-keys", "ft-values"]
        assert summary["runs"]["ft-keys"]["n"] == 2 and (out / name / "report.md").is_file()
    assert len((out / "timing.log").read_text().splitlines()) == 2  # one line per bench call
    compare = (out / "compare" / "compare.md").read_text()
    assert "| ft-keys − ft-values | Portability |" in compare
