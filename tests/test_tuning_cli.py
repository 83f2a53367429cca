"""`kvedit tune` and `kvedit report` end to end on tiny models: every option, outputs, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tuning_train import letters_lm

from kvedit.cli import main
from kvedit.models import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "tuning"
QUIET = ["--threads", "1", "--eval-batch-size", "2"]


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tune_tasks_then_report_adapter_eval_and_merge(capsys, tiny_folder, tmp_path):
    out = tmp_path / "tune"
    code = run(
        "tune",
        "--model",
        tiny_folder,
        "--tasks",
        "cb,boolq,race",
        "--data-dir",
        FIXTURES,
        "--task-source",
        f"boolq={FIXTURES / 'boolq_foundry.jsonl'}",
        "--train-n",
        3,
        "--test-n",
        2,
        "--targets",
        "attn-qv+values,keys",
        "--layers",
        "1,-1",
        "--steps",
        2,
        "--batch-size",
        2,
        "--grad-accum",
        1,
        "--max-length",
        48,
        "--rank",
        4,
        "--alpha",
        8,
        "--dropout",
        0.0,
        "--lr",
        1e-3,
        "--seed",
        1,
        "--checkpoint-every",
        1,
        "--out",
        out,
        *QUIET,
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "attn-qv+values: self_attn.q_proj, self_attn.v_proj, mlp.down_proj on layers [1, 3] (6 modules)" in text
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["untuned", "attn-qv+values", "keys"] and summary["complete"]
    assert summary["data"]["tasks"]["boolq"]["test"] == 1  # the foundry file: one record, split off as test
    assert summary["train_config"]["rank"] == 4 and summary["train_config"]["seed"] == 1
    keys = summary["runs"]["keys"]
    assert keys["trainable"] == 2 * 2 * 4 * (32 + 64) and keys["steps"] == 2
    assert set(keys["tasks"]) == {"cb", "boolq", "race"} and set(keys["tasks"]["cb"]) == {"exact", "rank"}
    table = (out / "table.md").read_text()
    assert "| Target" in table and "CB" in table and "RACE" in table and "sign test p" in table
    assert (out / "summary.csv").read_text().startswith("run,task,metric,mean")
    records = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5 and {r["run"] for r in records} == {"untuned", "attn-qv+values", "keys"}

    # the same command again resumes: nothing is retrained
    before = (out / "runs" / "keys" / "train.json").read_text()
    assert (
        run(
            "tune",
            "--model",
            tiny_folder,
            "--tasks",
            "cb,boolq,race",
            "--data-dir",
            FIXTURES,
            "--task-source",
            f"boolq={FIXTURES / 'boolq_foundry.jsonl'}",
            "--train-n",
            3,
            "--test-n",
            2,
            "--targets",
            "attn-qv+values,keys",
            "--layers",
            "1,-1",
            "--steps",
            2,
            "--batch-size",
            2,
            "--grad-accum",
            1,
            "--max-length",
            48,
            "--rank",
            4,
            "--alpha",
            8,
            "--dropout",
            0.0,
            "--lr",
            1e-3,
            "--seed",
            1,
            "--checkpoint-every",
            1,
            "--out",
            out,
            *QUIET,
        )
        == 0
    )
    assert "already evaluated, kept" in capsys.readouterr().out
    assert (out / "runs" / "keys" / "train.json").read_text() == before

    assert run("report", out) == 0
    report = (out / "report.md").read_text()
    assert "targets.png" in report and "loss.png" in report
    assert (out / "targets.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0

    # --adapter evaluates a saved adapter to the same predictions the run recorded
    adapter = out / "runs" / "keys" / "adapter"
    again = tmp_path / "again"
    assert (
        run(
            "tune",
            "--model",
            tiny_folder,
            "--tasks",
            "cb,boolq,race",
            "--data-dir",
            FIXTURES,
            "--task-source",
            f"boolq={FIXTURES / 'boolq_foundry.jsonl'}",
            "--train-n",
            3,
            "--test-n",
            2,
            "--adapter",
            adapter,
            "--out",
            again,
            *QUIET,
        )
        == 0
    )
    redone = [json.loads(l) for l in (again / "predictions.jsonl").read_text().splitlines()]
    assert [r["label_logprobs"] for r in redone] == [r["label_logprobs"] for r in records if r["run"] == "keys"]

    # --merge-out writes a plain model folder whose predictions equal the adapter's
    merged = tmp_path / "merged"
    assert run("tune", "--model", tiny_folder, "--adapter", adapter, "--merge-out", merged) == 0
    lm = load_model(merged)
    from kvedit.tuning.evaluate import predict
    from kvedit.tuning.runner import classification_data

    data = classification_data(
        ["cb", "boolq", "race"], FIXTURES, 3, 2, sources={"boolq": FIXTURES / "boolq_foundry.jsonl"}
    )
    plain = predict(lm, data.test, {n: t.labels for n, t in data.tasks.items()})
    flat = [x for p in plain for x in p.label_logprobs]
    assert flat == pytest.approx([x for r in redone for x in r["label_logprobs"]], abs=1e-4)
    untuned = [x for r in records if r["run"] == "untuned" for x in r["label_logprobs"]]
    assert flat != pytest.approx(untuned, abs=1e-7)  # the merge changed the weights


def test_tune_user_task_file_ia3_qiu2024(capsys, tiny_folder, tmp_path):
    out = tmp_path / "user"
    code = run(
        "tune",
        "--model",
        tiny_folder,
        "--task-file",
        FIXTURES / "user_task.csv",
        "--task-test-file",
        FIXTURES / "user_task.csv",
        "--template",
        "the {review} is",
        "--label-field",
        "stars",
        "--label-words",
        "1=paris,5=rome",
        "--preset",
        "qiu2024",
        "--adapter-type",
        "ia3",
        "--epochs",
        1,
        "--grad-accum",
        1,
        "--batch-size",
        2,
        "--packing",
        "--loss-on",
        "all",
        "--no-untuned",
        "--targets",
        "values",
        "--train-n",
        4,
        "--test-n",
        3,
        "--out",
        out,
        *QUIET,
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["values"]
    cfg = summary["train_config"]
    assert (cfg["preset"], cfg["adapter"], cfg["packing"], cfg["loss_on"], cfg["lr"]) == (
        "qiu2024",
        "ia3",
        True,
        "all",
        2e-4,
    )
    assert summary["runs"]["values"]["trainable"] == 4 * 64  # IA3: one scale per down_proj input, 4 layers
    assert summary["runs"]["values"]["tasks"]["user_task"]["rank"]["count"] == 3


def test_tune_instruct_mmlu(capsys, tmp_path):
    folder = tmp_path / "letters"
    lm = letters_lm()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "question x", "input": "", "output": "a"},
                {"instruction": "question y", "input": "x", "output": "b"},
            ]
        )
    )
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(
        "\n".join(
            json.dumps({"subject": s, "input": f"question {q} answer:", "output": o})
            for s, q, o in (("s1", "x", "A"), ("s1", "y", "B"), ("s2", "x", "C"))
        )
    )
    out = tmp_path / "mmlu-run"
    assert (
        run(
            "tune",
            "--model",
            folder,
            "--instruct",
            alpaca,
            "--mmlu",
            mmlu,
            "--train-n",
            2,
            "--test-n",
            3,
            "--targets",
            "keys,values",
            "--steps",
            1,
            "--batch-size",
            2,
            "--out",
            out,
            *QUIET,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "instruct" and list(summary["runs"]) == ["untuned", "keys", "values"]
    assert summary["runs"]["keys"]["mmlu"]["subjects"] == 2 and summary["runs"]["keys"]["mmlu"]["count"] == 3
    assert any(c["a"] == "keys" and c["b"] == "values" for c in summary["comparisons"])
    assert "MMLU (macro)" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--tasks", "cb", "--data-dir", FIXTURES, "--targets", "keys,key+values"],
            "valid roles: attn-qv, key-gate, key-up, keys, values",
        ),
        (["--tasks", "cb", "--data-dir", FIXTURES, "--layers", "7"], "layers 0..3"),
        (["--tasks", "cb", "--data-dir", FIXTURES, "--4bit"], "needs a CUDA GPU"),
        (["--tasks", "cb", "--data-dir", FIXTURES / "qnli"], "does not exist"),
        (["--tasks", "copa", "--data-dir", FIXTURES, "--test-n", "10"], "no training examples"),
        (["--tasks", "sst2", "--data-dir", FIXTURES], "unknown task"),
        (
            ["--task-file", FIXTURES / "cb" / "train.jsonl", "--template", "{text}:", "--label-words", "a,b"],
            r"no field \['text'\]",
        ),
        (["--task-file", FIXTURES / "qnli" / "dev.tsv"], "needs --template"),
        (["--instruct", FIXTURES / "user_task.csv"], "needs --mmlu"),
        (["--tasks", "cb", "--instruct", FIXTURES / "user_task.csv"], "exactly one of"),
        (
            ["--tasks", "cb", "--data-dir", FIXTURES, "--compute-dtype", "bfloat16"],
            "tune trains and evaluates adapters",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(capsys, tiny_folder, tmp_path, extra, message):
    if extra == ["--tasks", "cb", "--data-dir", FIXTURES, "--4bit"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "never"
    assert run("tune", "--model", tiny_folder, *extra, "--steps", 1, "--out", out, *QUIET) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
