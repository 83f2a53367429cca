"""The command line on a tiny model saved to a folder: models, edit --json, apply/revert round trip."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run
from transformers import AutoModelForCausalLM

from kvedit.cli import main
from kvedit.models.architectures import ARCHITECTURES


def test_models_lists_every_family():
    code, out, _ = run("models")
    assert code == 0
    for model_type in ARCHITECTURES:  # every row of the architecture table
        assert f"\n{model_type} " in "\n" + out


def test_edit_json_then_apply_and_revert(capsys, tiny_folder, tmp_path):
    patch = tmp_path / "patch.safetensors"
    code, out, _ = run(
        "edit",
        "--model",
        str(tiny_folder),
        "--method",
        "ft-values",
        "--prompt",
        "{} is located in the city of",
        "--subject",
        "the eiffel tower",
        "--new",
        "rome",
        "--true",
        "paris",
        "--lr",
        "0.01",
        "--steps",
        "40",
        "--neighborhood",
        "the louvre is located in the city of",
        "--save",
        str(patch),
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert set(result["before"]) == {"target_new", "target_true"}
    assert result["after"]["target_new"] > result["after"]["target_true"]
    assert result["after"]["target_new"] > result["before"]["target_new"]
    assert result["steps"] >= 1 and result["time_s"] > 0 and len(result["neighborhood"]["after"]) == 1
    assert patch.is_file() and patch.with_suffix(".json").is_file()

    edited, restored = tmp_path / "edited", tmp_path / "restored"
    assert run("apply", str(patch), "--model", str(tiny_folder), "--out", str(edited))[0] == 0
    assert run("revert", str(patch), "--model", str(edited), "--out", str(restored))[0] == 0
    original = AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict()
    changed = AutoModelForCausalLM.from_pretrained(edited).state_dict()
    back = AutoModelForCausalLM.from_pretrained(restored).state_dict()
    diff = [n for n in original if not torch.equal(original[n], changed[n])]
    assert diff == ["model.layers.0.mlp.down_proj.weight"]
    assert all(torch.equal(original[n], back[n]) for n in original)

    code, _, err = run("apply", str(patch), "--model", str(edited), "--out", str(tmp_path / "twice"))
    assert (
        code == 2
        and "differ from the unedited weights the patch records (it matches the patch's edited weights: the patch is applied already)"
        in err
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "no placeholder", "--subject", "x", "--new", "rome", "--true", "paris"], "exactly one"),
        (["--prompt", "{} is in", "--subject", "x", "--new", "rome", "--true", "rome"], "equals target_true"),
        (
            ["--prompt", "{} is in", "--subject", "x", "--new", "rome", "--true", "paris", "--layers", "9"],
            "out of range",
        ),
        (
            ["--prompt", "{} is in", "--subject", "x", "--new", "rome", "--true", "paris", "--stats", "self"],
            "--stats and --stats-tokens apply",
        ),
    ],
)
def test_edit_input_errors_exit_2_with_a_message(capsys, tiny_folder, args, message):
    code, _, err = run("edit", "--model", str(tiny_folder), *args)
    assert code == 2 and message in err


def test_bad_layer_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--prompt", "{} x", "--subject", "a", "--new", "b", "--layers", "three"])
    assert "comma-separated layer numbers" in capsys.readouterr().err


def test_stats_command_reports_every_layer(tiny_folder, tmp_path, kvedit_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["the eiffel tower is located in the city of paris"] * 50))
    code, out, _ = run(
        "stats", "--model", str(tiny_folder), "--layers", "1,2", "--source", str(corpus), "--tokens", "200"
    )
    assert code == 0
    assert "layer   1: 200 tokens, E[kkᵀ] (64, 64)" in out and "layer   2: 200 tokens" in out
    assert len(list((kvedit_cache / "stats").glob("*/*.safetensors"))) == 2


def test_demo_is_a_resumable_bench_over_the_demo_facts(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, _ = run("demo", "--model", str(tiny_folder), "--n", "2", "--out", str(out_dir))
    assert code == 0 and "| Method" in out and "2 cases" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["runs"]) == {"unedited", "ft-keys", "ft-values"} and summary["complete"]
    lines = (out_dir / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {json.loads(l)["run"] for l in lines} == {"unedited", "ft-keys", "ft-values"}
    assert {json.loads(l)["case_id"] for l in lines} == {"eiffel-tower", "colosseum"}  # the first demo facts
    cases = [json.loads(l) for l in lines]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
        for line in (out_dir / "table.md").read_text().split("\n\n")[1].splitlines()[2:]
    }  # the first table
    assert list(rows) == ["unedited", "ft-keys", "ft-values"]
    for method in ("unedited", "ft-keys", "ft-values"):
        s, mine = summary["runs"][method], [c for c in cases if c["run"] == method]
        assert s["n"] == 2 and (method == "unedited" or s["edit_time_s"] > 0)
        for c in mine:  # CounterFact efficacy: the new target more probable than the true one after the prompt
            wins = [new > true for new, true in zip(c["efficacy_p_new"], c["efficacy_p_true"], strict=True)]
            assert c["efficacy_success"] == pytest.approx(sum(wins) / len(wins))
        efficacy = s["metrics"]["efficacy_success"]
        assert efficacy["count"] == 2 and efficacy["mean"] == pytest.approx(
            50 * sum(c["efficacy_success"] for c in mine)
        )
        # the table shows the summary's means (× 100, two decimals) in the Efficacy column, one row per run
        assert rows[method][1:3] == ["–" if method == "unedited" else "1", "2"]  # #Edits, Cases
        assert rows[method][3].startswith(f"{efficacy['mean']:.2f} ± ")
    # run again: nothing is redone, and a third method adds only its own records
    assert run("demo", "--model", str(tiny_folder), "--n", "2", "--out", str(out_dir))[0] == 0
    assert len((out_dir / "cases.jsonl").read_text().splitlines()) == 6
    assert (
        run(
            "demo",
            "--model",
            str(tiny_folder),
            "--n",
            "2",
            "--out",
            str(out_dir),
            "--methods",
            "ft-keys,ft-values,ft-key-up",
        )[0]
        == 0
    )
    assert len((out_dir / "cases.jsonl").read_text().splitlines()) == 8
