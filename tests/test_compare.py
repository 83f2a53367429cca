"""`kvedit compare`: one bench comparison side by side across folders, turned round where asked, with clear
errors for what is not a bench folder."""

from __future__ import annotations

import json

import pytest
from helpers import FACTS as ALL_FACTS
from helpers import tiny, write_facts

from kvedit.bench.config import BenchConfig
from kvedit.bench.harness import Bench
from kvedit.cli import main
from kvedit.reports.compare import parse_pairs

FACTS = ALL_FACTS[:3] + ALL_FACTS[4:]


@pytest.fixture
def two_folders(tmp_path):
    """Two bench folders (two tiny models) with FT on keys and on values over the same facts."""
    dataset = write_facts(tmp_path / "facts.json", FACTS)
    folders = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        config = BenchConfig(dataset=str(dataset), methods=("ft-keys", "ft-values"), extra={"max_steps": 3})
        Bench(tiny("llama", seed=seed), config, out, progress=False).run()
        folders.append(out)
    return folders


def test_compare_puts_each_folders_paired_differences_side_by_side(two_folders, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                *map(str, two_folders),
                "--out",
                str(out),
                "--labels",
                "first,second",
                "--pairs",
                "ft-values:ft-keys",
            ]
        )
        == 0
    )
    result = json.loads((out / "compare.json").read_text())
    assert list(result["columns"]) == ["first", "second"]
    for label, folder in zip(("first", "second"), two_folders):
        stored = {
            c["metric"]: c
            for c in json.loads((folder / "summary.json").read_text())["comparisons"]
            if c["a"] == "ft-keys" and c["b"] == "ft-values"
        }
        got = result["columns"][label]["ft-values|ft-keys|Paraphrase"]
        assert got["mean_difference"] == pytest.approx(-stored["paraphrase_success"]["mean_difference"])
        assert (got["wins"], got["losses"]) == (
            stored["paraphrase_success"]["losses"],
            stored["paraphrase_success"]["wins"],
        )
        if stored["paraphrase_success"]["ci"]:
            lo, hi = stored["paraphrase_success"]["ci"]
            assert got["ci"] == pytest.approx([-hi, -lo])
    table = (out / "compare.md").read_text()
    assert "| ft-values − ft-keys | Specificity |" in table and "| first | second |" in table
    assert (out / "compare.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_compare_refuses_what_it_cannot_read(two_folders, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) != 0
    assert "summary.json not found" in capsys.readouterr().err
    assert main(["compare", str(two_folders[0]), "--out", str(tmp_path / "c"), "--pairs", "ft-keys"]) != 0
    assert "not A:B" in capsys.readouterr().err
    assert parse_pairs("pmet x100:memit x100, a:b") == (("pmet x100", "memit x100"), ("a", "b"))


def test_a_pair_stored_the_other_way_round_is_turned_round(tmp_path):
    from kvedit.reports.compare import write_comparison

    stored = {
        "a": "memit",
        "b": "pmet",
        "metric": "paraphrase_success",
        "mean_difference": 9.5,
        "ci": [5.0, 14.0],
        "sign_test_p": 7e-5,
        "wins": 21,
        "losses": 2,
        "ties": 177,
        "count": 200,
    }
    for name, suite in (("cf", "counterfact"), ("zs", "zsre")):
        metric = "paraphrase_success" if suite == "counterfact" else "paraphrase_accuracy"
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(
            json.dumps({"suite": suite, "model": f"/models/{name}-model", "comparisons": [stored | {"metric": metric}]})
        )
    path = write_comparison([tmp_path / "cf", tmp_path / "zs"], tmp_path / "out", [("pmet", "memit")])
    text = path.read_text()
    assert "| pmet − memit | Paraphrase | -9.5 [-14.0, -5.0], p 7e-05 | -9.5 [-14.0, -5.0], p 7e-05 |" in text
    assert "cf-model · counterfact" in text and "zs-model · zsre" in text
    assert "Efficacy" not in text  # only what some folder holds
    got = json.loads((tmp_path / "out" / "compare.json").read_text())["columns"]["cf-model · counterfact"]
    assert (got["pmet|memit|Paraphrase"]["wins"], got["pmet|memit|Paraphrase"]["losses"]) == (2, 21)


def test_compare_lists_every_runs_scores_side_by_side(two_folders, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, two_folders), "--out", str(out), "--labels", "first,second"]) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    table = (out / "compare.md").read_text()
    for label, folder in zip(("first", "second"), two_folders):
        stored = json.loads((folder / "summary.json").read_text())["runs"]["ft-keys"]["metrics"]
        got = runs[label]["ft-keys"]
        assert got["Paraphrase"] == pytest.approx(stored["paraphrase_success"]["mean"])
        assert got["Score"] == pytest.approx(stored["score"]["mean"])
        assert got["n"] == len(FACTS)
    first = runs["first"]["ft-values"]
    cell = f"{first['Efficacy']:.1f} / {first['Paraphrase']:.1f} / {first['Specificity']:.1f} ({first['Score']:.1f})"
    assert f"| ft-values | {cell} |" in table


def test_a_run_short_of_its_folders_cases_says_so():
    from kvedit.reports.compare import _run_cell

    run = {"Efficacy": 96.0, "Paraphrase": 84.5, "Specificity": None, "Score": 88.25, "n": 55}
    assert _run_cell(run, 200) == "96.0 / 84.5 / – (88.2, 55 of 200 cases)"
    assert _run_cell({**run, "n": 200}, 200) == "96.0 / 84.5 / – (88.2)"
    assert _run_cell(None, 200) == "–"
