"""`kvedit bench --suite`: which metrics a file is scored with is explicit, never guessed silently; titles name
the user's file and the metrics as the table does; folders refuse to resume under another suite or precision."""

from __future__ import annotations

import csv
import io
import json

import pytest
from helpers import FACTS, write_facts, write_zsre

from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import BenchError
from kvedit.bench.harness import Bench
from kvedit.cli import main
from kvedit.reports.bench_report import write_report


@pytest.fixture
def dataset(tmp_path):
    return write_facts(tmp_path / "facts.json", FACTS)


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
    zsre = write_zsre(tmp_path / "zsre.json")
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
    argv = ["bench", "--model", tiny_folder, "--dataset", path, "--suite", "zsre", "--methods", "ft-keys", "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert "my_facts.json, zsRE metrics on" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--dataset", str(path), "--suite", "squad", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'squad'" in capsys.readouterr().err
