"""`kvedit bench` and `kvedit report` on a tiny model: files written, resume after a kill, the
known-fact filter, sequential runs, restored weights, and clear errors."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from types import MappingProxyType

import pytest
from helpers import same, snapshot, write_facts

import kvedit.bench.runner as batch_runner_module
from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import (
    LOCK_FILE,
    BenchError,
    FolderInUseError,
    check_bench_folder,
    load_cases_file,
    lock_bench_folder,
)
from kvedit.bench.harness import Bench
from kvedit.cli import main
from kvedit.data.download import download, resolve_dataset
from kvedit.data.loaders import DatasetError, load_requests
from kvedit.evaluation import target_nll
from kvedit.evaluation.known import known_filter
from kvedit.reports.bench_report import write_report

FACTS = [
    ("{} is located in the city of", "the eiffel tower", "rome", "paris"),
    ("{} is located in the city of", "the colosseum", "london", "rome"),
    ("{} is the capital of", "berlin", "spain", "germany"),
    ("{} is located in the city of", "big ben", "madrid", "london"),
    ("the official language of {} is", "france", "german", "french"),
]


@pytest.fixture
def dataset(tmp_path):
    return write_facts(tmp_path / "facts.json", FACTS)


def _count_edits(monkeypatch):
    calls = []
    real = batch_runner_module.edit

    def counting(lm, requests, method, **kw):
        calls.append([r.case_id for r in requests])
        return real(lm, requests, method, **kw)

    monkeypatch.setattr(batch_runner_module, "edit", counting)
    return calls


def test_bench_writes_results_and_resumes_after_a_kill(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=4)
    before = snapshot(tiny_llama)
    summary = Bench(tiny_llama, config, out, progress=False).run()
    assert same(before, snapshot(tiny_llama))  # every edit reverted
    records = load_cases_file(out / "cases.jsonl")
    assert sorted((r["run"], r["case_id"]) for r in records) == sorted(
        [("unedited", i) for i in range(4)] + [("ft-keys", i) for i in range(4)]
    )
    run = summary["runs"]["ft-keys"]
    assert run["n"] == 4 and run["metrics"]["efficacy_success"]["count"] == 4
    assert run["metrics"]["fluency"]["mean"] is None  # no generation prompts: absent
    assert summary["complete"] and (out / "summary.csv").exists() and "| ft-keys" in (out / "table.md").read_text()
    # EasyEdit's definitions beside the reference ones: the unedited model leaves its own predictions unchanged
    assert summary["runs"]["unedited"]["metrics"]["neighborhood_unchanged"]["mean"] == 100.0
    assert run["metrics"]["neighborhood_unchanged"]["count"] == 4
    assert all("neighborhood_argmax" not in r for r in records if r["run"] == "ft-keys")
    assert "EasyEdit" in (out / "table.md").read_text()
    full = json.loads((out / "summary.json").read_text())

    # a kill mid-write: the last two ft-keys records are lost and a torn line is left behind
    lines = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:25])
    calls = _count_edits(monkeypatch)
    with pytest.warns(UserWarning, match="partly written"):
        Bench(tiny_llama, config, out, progress=False).run()
    assert calls == [[2], [3]]  # only the missing cases are edited again
    records = load_cases_file(out / "cases.jsonl")
    assert len(records) == 8
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["runs"]["ft-keys"]["n"] == 4
    assert resumed["runs"]["unedited"] == full["runs"]["unedited"]
    # EasyEdit's locality after the resume still compares with the unedited predictions on file
    assert (
        resumed["runs"]["ft-keys"]["metrics"]["neighborhood_unchanged"]
        == full["runs"]["ft-keys"]["metrics"]["neighborhood_unchanged"]
    )

    # growing n reuses what is there
    calls.clear()
    Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=5), out, progress=False).run()
    assert calls == [[4]]


def test_a_finished_run_is_summarised_while_the_next_one_runs(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = batch_runner_module.edit

    def killed_in_values(lm, requests, method, **kw):
        if method == "ft-values":
            raise KeyboardInterrupt  # e.g. Ctrl-C in the second run of a long bench
        return real(lm, requests, method, **kw)

    monkeypatch.setattr(batch_runner_module, "edit", killed_in_values)
    config = BenchConfig(dataset=str(dataset), methods=("ft-keys", "ft-values"), n=3)
    with pytest.raises(KeyboardInterrupt):
        Bench(tiny_llama, config, out, progress=False).run()
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["complete"] and summary["runs"]["ft-keys"]["n"] == 3 and "ft-values" not in summary["runs"]
    assert "| ft-keys" in (out / "table.md").read_text()


def test_bench_prepares_each_run_before_its_timed_edits(tiny_llama, dataset, tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(batch_runner_module, "prepare", lambda lm, method, **kw: order.append(("prepare", method)))
    real = batch_runner_module.edit

    def logged(lm, requests, method, **kw):
        order.append(("edit", method))
        return real(lm, requests, method, **kw)

    monkeypatch.setattr(batch_runner_module, "edit", logged)
    config = BenchConfig(dataset=str(dataset), methods=("ft-keys", "ft-values"), n=2)
    Bench(tiny_llama, config, tmp_path / "run", progress=False).run()
    assert order == [
        ("prepare", "ft-keys"),
        ("edit", "ft-keys"),
        ("edit", "ft-keys"),
        ("prepare", "ft-values"),
        ("edit", "ft-values"),
        ("edit", "ft-values"),
    ]
    order.clear()
    Bench(tiny_llama, config, tmp_path / "run", progress=False).run()  # nothing left to do: nothing prepared
    assert order == []


def test_locality_for_a_folder_written_before_predictions_were_kept(tiny_llama, dataset, tmp_path):
    out = tmp_path / "run"
    config = BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=2)
    Bench(tiny_llama, config, out, progress=False).run()
    records = load_cases_file(out / "cases.jsonl")
    expected = {r["case_id"]: r["neighborhood_unchanged"] for r in records if r["run"] == "ft-keys"}
    # an older folder: unedited records without predictions, and no ft-keys run yet
    old = [{k: v for k, v in r.items() if k != "neighborhood_argmax"} for r in records if r["run"] == "unedited"]
    (out / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    Bench(tiny_llama, config, out, progress=False).run()
    again = {
        r["case_id"]: r["neighborhood_unchanged"] for r in load_cases_file(out / "cases.jsonl") if r["run"] == "ft-keys"
    }
    assert again == pytest.approx(expected)


def test_bench_refuses_a_folder_with_other_settings(tiny_llama, dataset, tmp_path):
    out = tmp_path / "run"
    Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=1), out, progress=False).run()
    with pytest.raises(BenchError, match="known_only"):
        Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=1, known_only=True), out)
    # hparam overrides given as tuples match their JSON form on resume: the second construction resumes
    for _ in range(2):
        Bench(
            tiny_llama,
            BenchConfig(dataset=str(dataset), methods=("ft-keys",), extra={"layers": (0, 1)}),
            tmp_path / "extra",
        )
    assert json.loads((tmp_path / "extra" / "config.json").read_text())["extra"] == {"layers": [0, 1]}


def test_a_run_resumed_after_its_preset_changed_is_refused(tiny_llama, dataset, tmp_path, monkeypatch):
    from kvedit.editing import finetune

    out = tmp_path / "run"
    Bench(
        tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys", "ft-values"), n=2), out, progress=False
    ).run()
    assert json.loads((out / "settings.json").read_text())["ft-keys"]["layers"] == [0]
    monkeypatch.setattr(finetune, "default_layers", lambda lm: (2,))  # e.g. a layer chosen for the model since
    keys_only = BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=2)
    with pytest.raises(BenchError, match=r"ft-keys: layers \[0\] -> \[2\]"):
        Bench(tiny_llama, keys_only, out, progress=False)
    # with that run's records removed, it is redone at the new setting; the other run's entry is kept
    lines = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text("".join(l + "\n" for l in lines if '"run": "ft-keys"' not in l))
    summary = Bench(tiny_llama, keys_only, out, progress=False).run()
    assert summary["settings"]["ft-keys"]["layers"] == [2] and summary["runs"]["ft-keys"]["n"] == 2
    assert summary["settings"]["ft-values"]["layers"] == [0]  # a run of an earlier invocation keeps its entry
    assert "ft-values: preset default, layer 0" in (out / "table.md").read_text()
    assert json.loads((out / "settings.json").read_text())["ft-values"]["layers"] == [0]
    # a folder from before settings.json: its records are kept, with a warning naming the settings assumed
    (out / "settings.json").unlink()
    with pytest.warns(UserWarning, match=r"records of ft-keys from before .* layer 2"):
        Bench(tiny_llama, keys_only, out, progress=False)


def test_known_filter_compares_true_and_new(tiny_llama, dataset, tmp_path):
    requests = load_requests(dataset)
    flags = known_filter(tiny_llama, requests)
    prompts = [r.rewrite_prompt for r in requests]
    new = target_nll(tiny_llama, prompts, [r.target_new for r in requests])
    true = target_nll(tiny_llama, prompts, [r.target_true for r in requests])
    assert flags == [bool(t < n) for t, n in zip(true, new)]
    bench = Bench(
        tiny_llama,
        BenchConfig(dataset=str(dataset), methods=("ft-keys",), known_only=True),
        tmp_path / "known",
        progress=False,
    )
    assert [r.case_id for r in bench.cases] == [r.case_id for r, keep in zip(requests, flags) if keep]
    assert bench.filter_info["known_kept"] == sum(flags)


def test_skip_leaves_out_the_first_known_cases(tiny_llama, dataset, tmp_path, capsys, tiny_folder, monkeypatch):
    import kvedit.evaluation.known as known_module  # the counterfact suite's known rule ("known:known_filter")

    requests = load_requests(dataset)
    flags = [i % 2 == 0 for i in range(len(requests))]  # a random tiny model knows nothing: say which it knows
    monkeypatch.setattr(known_module, "known_filter", lambda lm, reqs: flags[: len(reqs)])
    known = [r.case_id for r, keep in zip(requests, flags) if keep]
    assert len(known) >= 3
    config = dict(dataset=str(dataset), methods=("ft-keys",), known_only=True)
    bench = Bench(tiny_llama, BenchConfig(**config, skip=2, n=1), tmp_path / "report", progress=False)
    assert [r.case_id for r in bench.cases] == known[2:3] and bench.filter_info["skipped"] == 2
    with pytest.raises(BenchError, match="skip"):  # another split in the same folder
        Bench(tiny_llama, BenchConfig(**config, n=1), tmp_path / "report")
    with pytest.raises(BenchError, match="no cases left"):
        Bench(tiny_llama, BenchConfig(**config, skip=len(known)), tmp_path / "empty")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "bench",
                "--model",
                str(tiny_folder),
                "--dataset",
                str(dataset),
                "--skip",
                "-1",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
    assert exit_.value.code == 2 and "--skip" in capsys.readouterr().err
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_folder),
                "--dataset",
                str(dataset),
                "--known-only",
                "--skip",
                "1",
                "--n",
                "1",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["cases"]["skipped"] == 1


def test_sequential_bench_keeps_patches_and_restores_weights(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "seq"
    config = BenchConfig(dataset=str(dataset), methods=("ft-values",), n=4, batch_sizes=(2,), sequential=True)
    before = snapshot(tiny_llama)
    Bench(tiny_llama, config, out, progress=False).run()
    assert same(before, snapshot(tiny_llama))
    records = [r for r in load_cases_file(out / "cases.jsonl") if r["run"] != "unedited"]
    assert [r["n_edited"] for r in records] == [2, 2, 4, 4]
    assert "earlier_efficacy" in records[-1] and "earlier_efficacy" not in records[0]
    assert (out / "state" / "ft-values_x2_seq" / "chain.safetensors").is_file()  # W₀ → last batch (seqrun)
    calls = _count_edits(monkeypatch)
    Bench(tiny_llama, config, out, progress=False).run()  # all done: nothing edited
    assert calls == [] and same(before, snapshot(tiny_llama))


def test_failure_keeps_finished_cases_and_weights(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "fail"
    real = batch_runner_module.edit
    calls = []

    def flaky(lm, requests, method, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(lm, requests, method, **kw)

    monkeypatch.setattr(batch_runner_module, "edit", flaky)
    before = snapshot(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"):
        Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=4), out, progress=False).run()
    assert same(before, snapshot(tiny_llama))
    assert [r["case_id"] for r in load_cases_file(out / "cases.jsonl") if r["run"] == "ft-keys"] == [0, 1]


def test_bad_settings_are_clear_errors(tiny_llama, dataset, tmp_path):
    with pytest.raises(BenchError, match="--methods"):
        BenchConfig(dataset=str(dataset), methods=("ft-everything",)).specs()
    with pytest.raises(BenchError, match="--batch-size"):
        BenchConfig(dataset=str(dataset), methods=("ft-keys",), batch_sizes=(0,)).specs()
    zsre = tmp_path / "zsre.json"
    zsre.write_text(
        json.dumps(
            [
                {
                    "subject": "rome",
                    "src": "where is rome?",
                    "answers": ["italy"],
                    "rephrase": "rome is in?",
                    "loc": "nq question: who is",
                    "loc_ans": "paris",
                }
            ]
        )
    )
    with pytest.raises(BenchError, match="target_true"):
        Bench(tiny_llama, BenchConfig(dataset=str(zsre), methods=("ft-keys",), known_only=True), tmp_path / "z")
    with pytest.raises(DatasetError, match="neither a file nor an official name"):
        resolve_dataset("no-such-dataset")


def test_zsre_bench_reports_token_accuracy(tiny_llama, tmp_path):
    zsre = tmp_path / "zsre.json"
    zsre.write_text(
        json.dumps(
            [
                {
                    "subject": "rome",
                    "src": "where is rome?",
                    "answers": ["italy"],
                    "rephrase": "rome is in?",
                    "loc": "nq question: who is",
                    "loc_ans": "paris",
                }
            ]
        )
    )
    summary = Bench(
        tiny_llama, BenchConfig(dataset=str(zsre), methods=("ft-keys",)), tmp_path / "z", progress=False
    ).run()
    assert summary["suite"] == "zsre"
    assert summary["runs"]["ft-keys"]["metrics"]["efficacy_accuracy"]["mean"] == 100.0


def test_download_failure_is_clear_and_leaves_no_file(tmp_path):
    dest = tmp_path / "counterfact.json"
    with pytest.raises(DatasetError, match="cannot download"):
        download("http://127.0.0.1:9/counterfact.json", dest, timeout=2)
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_cli_bench_sweep_and_report(capsys, dataset, tiny_folder, tmp_path):
    folder = tiny_folder
    out = tmp_path / "sweep"
    code = main(
        [
            "bench",
            "--model",
            str(folder),
            "--dataset",
            str(dataset),
            "--methods",
            "ft-keys,ft-values",
            "--n",
            "3",
            "--layers",
            "0,2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "ft-keys@L0" in printed and "ft-values@L2" in printed
    # the settings each run used, as resolved for the model: which preset row, which layer
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["ft-values@L2"]["layers"] == [2] and settings["ft-keys@L0"]["target"] == "keys"
    assert settings["ft-keys@L0"]["preset"] == "default" and settings["ft-keys@L0"]["lr"] == 2e-3
    assert "ft-values@L2: preset default, layer 2, lr 0.002" in (out / "table.md").read_text()
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "![metrics](metrics.png)" in report and "![layer](layers.png)" in report and "Paired comparisons" in report
    for png in ("metrics.png", "layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exc:  # an argument error, before the model loads
        main(["bench", "--model", str(folder), "--dataset", str(dataset), "--methods", "nope", "--out", str(out)])
    assert exc.value.code == 2 and "--methods" in capsys.readouterr().err


def test_cli_table3_preset(capsys, dataset, tiny_folder, tmp_path):
    folder = tiny_folder
    out = tmp_path / "table3"
    assert (
        main(
            [
                "bench",
                "--model",
                str(folder),
                "--dataset",
                str(dataset),
                "--preset",
                "table3",
                "--n",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert list(runs) == ["unedited", "ft-keys", "ft-values", "ft-keys x10", "ft-values x10"]
    assert runs["ft-keys x10"]["batch_size"] == 10 and runs["ft-keys x10"]["n"] == 3


def test_official_dataset_downloads_once_into_the_cache(tmp_path, kvedit_cache, monkeypatch):
    import functools
    import http.server
    import threading

    from kvedit.data import download as download_module

    served = tmp_path / "served"
    served.mkdir()
    records = [
        {
            "subject": "rome",
            "src": "where is rome?",
            "answers": ["italy"],
            "rephrase": "rome is in?",
            "loc": "nq question: who is",
            "loc_ans": "paris",
        }
    ]
    (served / "zsre_mend_eval.json").write_text(json.dumps(records))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/zsre_mend_eval.json"
        served_table = dict(download_module.OFFICIAL_DATASETS) | {
            "zsre": download_module.OfficialDataset("zsre_mend_eval.json", url, "zsre")
        }
        monkeypatch.setattr(download_module, "OFFICIAL_DATASETS", MappingProxyType(served_table))
        path, fmt = resolve_dataset("zsre")
        assert path == kvedit_cache / "datasets" / "zsre_mend_eval.json" and fmt == "zsre"
        assert load_requests(path, fmt)[0].target_new == "italy"
        (served / "zsre_mend_eval.json").unlink()  # a second call reads the cached copy
        assert resolve_dataset("zsre")[0] == path
    finally:
        server.shutdown()


# ---------------------------------------------------------------- the suite is explicit (issue 34)


def _own_facts(tmp_path, name="my_facts.json", **extra):
    """kvedit-format records without target_true: what a user writing zsRE-style facts would have."""
    path = tmp_path / name
    path.write_text(
        json.dumps(
            [
                {
                    "prompt": p,
                    "subject": s,
                    "target_new": n,
                    "case_id": f"fact-{i}",
                    "paraphrase_prompts": [f"{s} lies in"],
                    **extra,
                }
                for i, (p, s, n, _) in enumerate(FACTS[:2])
            ]
        )
    )
    return path


def test_a_file_without_target_true_is_not_silently_scored_as_zsre(tiny_llama, tmp_path):
    path = _own_facts(tmp_path)
    with pytest.raises(BenchError, match=r"case 'fact-0' has no target_true.*--suite zsre"):
        Bench(tiny_llama, BenchConfig(dataset=str(path), methods=("ft-keys",)), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_suite_zsre_asked_for_scores_token_accuracy_and_says_so(tiny_llama, tmp_path):
    path = _own_facts(tmp_path, neighborhood_prompts=["the louvre is located in"], neighborhood_target="paris")
    out = tmp_path / "z"
    summary = Bench(
        tiny_llama, BenchConfig(dataset=str(path), methods=("ft-keys",), suite="zsre"), out, progress=False
    ).run()
    assert summary["suite"] == "zsre" and "efficacy_accuracy" in summary["runs"]["ft-keys"]["metrics"]
    title = (out / "table.md").read_text().splitlines()[0]
    assert title.startswith("my_facts.json, zsRE metrics on ") and summary["title"] == title
    assert json.loads((out / "config.json").read_text())["suite"] == "zsre"
    # the same folder cannot be resumed under the other suite: its records hold the other metrics
    with pytest.raises(BenchError, match="suite"):
        Bench(
            tiny_llama, BenchConfig(dataset=str(path), methods=("ft-keys",), suite="counterfact"), out, progress=False
        )


def test_a_file_that_does_not_fit_the_suite_asked_for_names_case_and_field(tiny_llama, dataset, tmp_path):
    with pytest.raises(BenchError, match=r"case 0 has neighborhood_prompts but no neighborhood_target.*--suite zsre"):
        Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), suite="zsre"), tmp_path / "a")
    zsre = tmp_path / "zsre.json"
    zsre.write_text(
        json.dumps(
            [
                {
                    "subject": "rome",
                    "src": "where is rome?",
                    "answers": ["italy"],
                    "rephrase": "rome is in?",
                    "loc": "nq question: who is",
                    "loc_ans": "paris",
                }
            ]
        )
    )
    with pytest.raises(BenchError, match=r"case 0 has no target_true, which --suite counterfact needs"):
        Bench(tiny_llama, BenchConfig(dataset=str(zsre), methods=("ft-keys",), suite="counterfact"), tmp_path / "b")
    with pytest.raises(BenchError, match="--suite 'squad'"):
        BenchConfig(dataset=str(zsre), methods=("ft-keys",), suite="squad").specs()


def test_a_users_file_is_titled_by_its_name_and_metrics_are_named_as_in_the_table(tiny_llama, dataset, tmp_path):
    out = tmp_path / "run"
    summary = Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=2), out, progress=False).run()
    table = (out / "table.md").read_text()
    assert table.startswith("facts.json, CounterFact metrics on ") and not table.startswith("counterfact on")
    assert summary["suite"] == "counterfact"
    titles = summary["metric_titles"]
    assert titles["neighborhood_success"] == "Specificity" and titles["efficacy_success"] == "Efficacy"
    assert all(key in titles for key in summary["runs"]["ft-keys"]["metrics"])
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert {r["metric_title"] for r in rows if r["metric"] == "neighborhood_success"} == {"Specificity"}
    # report and compare still read a summary written before titles were recorded, and name the file
    old = {k: v for k, v in summary.items() if k not in ("title", "metric_titles")}
    (out / "summary.json").write_text(json.dumps(old))
    report = write_report(out).read_text()
    assert report.startswith("# kvedit bench: facts.json, CounterFact metrics on ")
    assert "Specificity is `neighborhood_success`" in report


def test_a_folder_written_before_the_suite_was_recorded_resumes(tiny_llama, dataset, tmp_path):
    out = tmp_path / "run"
    config = BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=2)
    Bench(tiny_llama, config, out, progress=False).run()
    stored = json.loads((out / "config.json").read_text())
    del stored["suite"]
    (out / "config.json").write_text(json.dumps(stored))
    summary = Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=3), out, progress=False).run()
    assert summary["complete"] and summary["runs"]["ft-keys"]["n"] == 3


def test_a_folder_run_in_one_compute_precision_is_not_resumed_in_another(tiny_llama, dataset, tmp_path):
    out = tmp_path / "run"
    Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=2), out, progress=False).run()
    assert json.loads((out / "config.json").read_text())["compute_dtype"] == "float32"
    tiny_llama.compute_dtype = "bfloat16"  # as --compute-dtype bfloat16 sets it (no bf16 pass runs here)
    try:
        with pytest.raises(BenchError, match="compute_dtype"):
            Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=3), out, progress=False)
    finally:
        tiny_llama.compute_dtype = "float32"


def test_cli_bench_suite_flag(capsys, tiny_folder, tmp_path):
    path = _own_facts(tmp_path, neighborhood_prompts=["the louvre is located in"], neighborhood_target="paris")
    out = tmp_path / "cli"
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_folder),
                "--dataset",
                str(path),
                "--suite",
                "zsre",
                "--methods",
                "ft-keys",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "my_facts.json, zsRE metrics on" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--dataset", str(path), "--suite", "squad", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'squad'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- one process per folder

CLI = "import sys; from kvedit.cli import main; sys.exit(main())"
HOLD = (
    "import sys, time; from kvedit.bench.folder import lock_bench_folder; lock_bench_folder(sys.argv[1]); "
    "print('locked', flush=True); time.sleep(float(sys.argv[2]))"
)


def _holder_pid(out):
    try:
        return json.loads((out / LOCK_FILE).read_text() or "{}").get("pid")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_a_second_bench_process_on_a_folder_in_use_is_refused(tiny_folder, tmp_path):
    """Two `kvedit bench` processes on one --out both ran every case (24 lines for 12 records): the second is now
    refused, naming the first, while the first runs; the folder ends with each case once."""
    dataset = tmp_path / "facts.json"
    records = [
        {"prompt": p, "subject": s, "target_new": n, "target_true": t, "case_id": 10 * k + i}
        for k in range(3)
        for i, (p, s, n, t) in enumerate(FACTS)
    ]
    dataset.write_text(json.dumps(records))
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-c",
        CLI,
        "bench",
        "--model",
        str(tiny_folder),
        "--dataset",
        str(dataset),
        "--methods",
        "ft-keys",
        "--out",
        str(out),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while _holder_pid(out) != first.pid:
            assert first.poll() is None, f"the first process ended before locking the folder: {first.stderr.read()}"
            assert time.monotonic() < deadline, "the first process never locked the folder"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)  # keep it mid-run, holding the folder, while the second one starts
        assert first.poll() is None, "the first process finished before the second could start; use more cases"
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert f"is in use by another kvedit process: pid {first.pid} on host " in second.stderr
        assert "running `" in second.stderr and f"--out {out}`" in second.stderr and " since " in second.stderr
        assert "Traceback" not in second.stderr
        output, errors = first.communicate(timeout=300)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, errors
    keys = [(r["run"], r["case_id"]) for r in load_cases_file(out / "cases.jsonl")]
    assert len(keys) == len(set(keys)) == 2 * len(records)
    assert (out / LOCK_FILE).read_text() == ""  # a clean exit clears the holder's entry


def test_a_killed_holder_leaves_no_false_lock(tmp_path):
    """The lock is the kernel's (flock): a holder killed with SIGKILL holds nothing; its entry is taken over with a
    warning naming it. The process holding the lock may take it again."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=rf"pid {holder.pid} on host .*running `.*lock_bench_folder"):
            check_bench_folder(out)  # the look before any model work
        with pytest.raises(FolderInUseError, match=rf"in use by another kvedit process: pid {holder.pid}"):
            lock_bench_folder(out, wait=0.1)
    finally:
        holder.kill()
        holder.wait()
    assert _holder_pid(out) == holder.pid  # kill -9 ran no clean-up: the entry is left, the lock is not
    check_bench_folder(out)
    with pytest.warns(UserWarning, match=rf"taking over the lock left by pid {holder.pid} .* is no longer running"):
        lock_bench_folder(out)
    assert _holder_pid(out) == os.getpid()
    lock_bench_folder(out)  # again in the process that holds it: nothing happens
    check_bench_folder(out)
    # a holder that exits normally clears its entry: the next one takes the folder without a warning
    done = tmp_path / "done"
    subprocess.run([sys.executable, "-c", HOLD, str(done), "0"], check=True, capture_output=True, timeout=60)
    assert (done / LOCK_FILE).read_text() == ""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lock_bench_folder(done)
