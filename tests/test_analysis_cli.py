"""`kvedit analyze …` and `kvedit inspect` end to end on a tiny model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run

import kvedit
from kvedit.cli import main
from kvedit.models import load_model

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = (
    "the eiffel tower is located in paris. the colosseum is in rome. berlin is the capital of germany.\n"
    "madrid is the capital of spain. french is spoken in france. it was born in london.\n"
)
#: the text of the `corpus_file` fixture (conftest)
CORPUS_TEXT = TEXT * 2


def test_analyze_all_then_each_command_reuses_the_folder(capsys, tiny_folder, corpus_file, tmp_path):
    out = tmp_path / "analysis"
    model = ("--model", tiny_folder)
    code, text, err = run(
        "analyze",
        "all",
        *model,
        "--corpus",
        corpus_file,
        "--out",
        out,
        "--trigger-tokens",
        "500",
        "--k",
        "5",
        "--keys",
        "1:3,2:10",
        "--layer-tokens",
        "40",
        "--dataset",
        FIXTURES / "easyedit_cf_small.json",
        "--n",
        "3",
    )
    assert code == 0, err
    assert "triggers: mined" in text and "| layer | agreement |" in text and "attention_cos" in text
    for name in (
        "triggers.safetensors",
        "meta.json",
        "triggers/layer-00.jsonl",
        "keys/L1-K3.md",
        "keys/L2-K10.md",
        "keys/L1-K3.html",
        "keys/L2-K10.html",
        "keys.md",
        "keys.html",
        "values/layer-03.jsonl",
        "values.md",
        "layers.csv",
        "layers.md",
        "components.csv",
        "analysis-agreement.png",
        "analysis-active.png",
        "analysis-composition.png",
        "analysis-shallow.png",
        "analysis-refinement.png",
        "analysis-ffn-changes.png",
        "analysis-components-cos.png",
        "analysis-components-jaccard.png",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "meta.json").read_text())["k"] == 5
    assert len((out / "components.jsonl").read_text().splitlines()) == 4

    code, text, _ = run(
        "analyze",
        "triggers",
        *model,
        "--corpus",
        corpus_file,
        "--out",
        out,
        "--tokens",
        "500",
        "--k",
        "5",
        "--layers",
        "1,2",
        "--keys",
        "2:1",
    )
    assert code == 0 and "triggers: reused" in text
    other = tmp_path / "abs"
    code, text, _ = run(
        "analyze",
        "triggers",
        *model,
        "--corpus",
        corpus_file,
        "--out",
        other,
        "--tokens",
        "300",
        "--k",
        "4",
        "--rank",
        "abs",
        "--jsonl-examples",
        "2",
        "--max-length",
        "6",
        "--layers",
        "1",
        "--batch-size",
        "2",
        "--batch-tokens",
        "7",
        "--keys",
        "1:0",
    )
    meta = json.loads((other / "meta.json").read_text())
    assert code == 0 and meta["rank"] == "abs" and meta["max_length"] == 6 and meta["layers"] == [1]
    first = json.loads((other / "triggers" / "layer-01.jsonl").read_text().splitlines()[0])
    assert len(first["examples"]) == 2 and all(e["position"] < 6 for e in first["examples"])
    code, _, _ = run("analyze", "values", *model, "--out", out, "--layers", "0", "--k", "3", "--final-norm")
    assert code == 0 and '"final_norm": true' in (out / "values" / "layer-00.jsonl").read_text()
    code, text, _ = run(
        "analyze",
        "layers",
        *model,
        "--corpus",
        corpus_file,
        "--out",
        out,
        "--tokens",
        "30",
        "--active-threshold",
        "0.5",
        "--batch-size",
        "2",
    )
    assert code == 0 and "0.5 × the token's largest" in (out / "layers.md").read_text()
    # each pair of objects appears both ways round, so exactly one case of each pair is known
    pairs = [("paris", "rome"), ("berlin", "madrid"), ("london", "paris")]
    cases = [
        {
            "prompt": f"the capital of {c} is",
            "subject": c,
            "target_new": new,
            "ground_truth": true,
            "rephrase_prompt": f"{c} has the capital",
            "locality_prompt": "the capital of spain is",
            "locality_ground_truth": "madrid",
        }
        for c, (a, b) in zip(["france", "germany", "italy"], pairs)
        for true, new in ((a, b), (b, a))
    ]
    cases = [case | {"case_id": i} for i, case in enumerate(cases)]
    dataset = tmp_path / "cases.json"
    dataset.write_text(json.dumps(cases))
    code, text, err = run("analyze", "components", *model, "--out", out, "--known-only", "--dataset", dataset)
    assert code == 0, err
    assert "known-fact filter" in err  # the filter pass has its progress bar
    assert code == 0 and "3 prompts (the first 3 rewrite prompts of cases.json the model gets right)" in text

    code, text, _ = run(
        "inspect",
        "berlin is the capital of",
        *model,
        "--triggers",
        out,
        "--top",
        "4",
        "--zero",
        "1:3",
        "--scale",
        "2:10=3",
        "--out",
        tmp_path / "one",
    )
    assert code == 0 and "## Intervention: L1:3×0, L2:10×3" in text and "KL(before‖after)" in text
    report = json.loads((tmp_path / "one" / "inspect.json").read_text())
    assert len(report["layers"][1]["memories"]) == 4 and "triggers" in report["layers"][1]["memories"][0]
    code, text, _ = run("inspect", "berlin is", *model, "--json", "--final-norm")
    assert code == 0 and json.loads(text)["prompt"] == "berlin is" and json.loads(text)["final_norm"]


def test_the_known_fact_filter_stops_once_it_has_n_and_keeps_corpus_order(tmp_path, tiny_llama):
    from kvedit.analysis.runs import counterfact_prompts
    from kvedit.evaluation.scoring import target_nll

    objects = ["paris", "rome", "london", "berlin", "madrid"]
    cases = [
        {
            "case_id": i,
            "prompt": f"{s} is located in the city of",
            "subject": s,
            "target_new": new,
            "ground_truth": true,
            "rephrase_prompt": "x",
            "locality_prompt": "y",
            "locality_ground_truth": "z",
        }
        for i, (s, true, new) in enumerate(
            (s, a, b) for s in ("the louvre", "big ben", "the colosseum") for a in objects for b in objects if a != b
        )
    ]
    dataset = tmp_path / "cases.json"
    dataset.write_text(json.dumps(cases))
    prompts = [c["prompt"].format(c["subject"]) for c in cases]
    true = target_nll(tiny_llama, prompts, [c["ground_truth"] for c in cases])
    new = target_nll(tiny_llama, prompts, [c["target_new"] for c in cases])
    known = [p for p, t, w in zip(prompts, true.tolist(), new.tolist()) if t < w]
    assert 3 < len(known) < len(cases)
    assert counterfact_prompts(tiny_llama, dataset, known_only=True, progress=False) == known
    assert counterfact_prompts(tiny_llama, dataset, 3, known_only=True, batch_size=2, progress=False) == known[:3]
    assert counterfact_prompts(tiny_llama, dataset, 2, progress=False) == prompts[:2]


def test_inspect_a_patch_made_by_kvedit_edit(capsys, tiny_folder, tmp_path):
    lm = load_model(str(tiny_folder))
    req = kvedit.EditRequest(
        "{} is located in the city of",
        "the eiffel tower",
        target_new="rome",
        target_true="paris",
        neighborhood_prompts=("the louvre is located in the city of",),
    )
    delta = kvedit.edit(lm, req, method="ft-keys", layers=(1,), max_steps=3)
    delta.revert(lm)
    patch = delta.save(tmp_path / "eiffel.safetensors")
    code, text, err = run(
        "inspect",
        "--patch",
        patch,
        "the eiffel tower is located in the city of",
        "--model",
        tiny_folder,
        "--out",
        tmp_path / "p",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert list(report["layers"]) == ["1"] and report["neighborhood"] == ["the louvre is located in the city of"]
    assert "key:gate" in report["layers"]["1"]["changed"] and "mean |Δm| on neighbourhood prompts" in text
    code, text, err = run(
        "inspect",
        "--patch",
        patch,
        "the eiffel tower is located in the city of",
        "--model",
        tiny_folder,
        "--neighborhood",
        "berlin is the capital of",
        "--final-norm",
        "--json",
    )
    assert code == 0, err
    assert json.loads(text)["neighborhood"] == ["berlin is the capital of"]


def test_inspect_several_prompts_in_one_call(capsys, tiny_folder, tmp_path, monkeypatch):
    import kvedit.cli.common as common

    loads = []
    real_load = common.load
    monkeypatch.setattr("kvedit.cli.analyze.load", lambda args: loads.append(1) or real_load(args))
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffberlin is the capital of\n\nmadrid is\n".encode())
    code, text, err = run(
        "inspect",
        "the eiffel tower is in",
        "--prompts-file",
        prompts,
        "--model",
        tiny_folder,
        "--top",
        "2",
        "--out",
        tmp_path / "many",
    )
    assert code == 0, err
    assert len(loads) == 1  # one model load for all three
    reports = json.loads((tmp_path / "many" / "inspect.json").read_text())
    assert [r["prompt"] for r in reports] == ["the eiffel tower is in", "berlin is the capital of", "madrid is"]
    one = run("inspect", "madrid is", "--model", tiny_folder, "--top", "2", "--json")[1]
    assert json.loads(one) == reports[2]  # each prompt's page is the one a single call gives
    assert text.count("# 'madrid is'") == 1 and text.count("## Logit lens") == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect"], "at least one non-empty PROMPT"),
        (["inspect", "--prompts-file", "missing.txt"], "is not a file"),
        (["analyze", "triggers", "--out", "x", "--keys", "3"], "LAYER:MEMORY pairs"),
        (["analyze", "layers", "--out", "x", "--tokens", "0"], "positive integer"),
        (["inspect", "p", "--zero", "1:2", "--patch", "nope.safetensors"], "cannot be combined"),
        (["inspect", "p", "--scale", "1:2"], "LAYER:MEMORY=FACTOR"),
        (["analyze", "layers", "--out", "x", "--active-threshold", "2"], "must be in (0, 1]"),
        (["analyze", "components", "--out", "x", "--dataset", "missing.json"], "is not a file"),
    ],
)
def test_bad_arguments_are_clear_errors(capsys, tiny_folder, tmp_path, argv, message):
    try:
        code = main([*argv, "--model", str(tiny_folder)])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    _, err = capsys.readouterr()
    assert code == 2 and message in err
    assert not (tmp_path / "x").exists()
