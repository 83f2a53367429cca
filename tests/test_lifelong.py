"""Sequential bench runs at scale (lifelong editing): history carried and resumed after a kill at any batch, the
per-batch records equal to a direct computation on the model at that point, revert of the whole chain, reports."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from helpers import FACTS
from tiny_models import tiny_lm

from kvedit.bench import Bench, BenchConfig
from kvedit.bench.folder import BenchError
from kvedit.bench.lifelong import LifelongSettings, check_settings
from kvedit.bench.runner import BatchRunner
from kvedit.bench.seqrun import SequentialRun, load_chain, run_dir, sequence_records
from kvedit.cli import main
from kvedit.data.loaders import load_requests
from kvedit.editing.alphaedit_state import AlphaEditHistory
from kvedit.evaluation.counterfact import counterfact_case_metrics
from kvedit.evaluation.general_ability import GeneralAbilityProbe, weight_change
from kvedit.reports.bench_report import write_report
from kvedit.reports.lifelong_pairs import milestone_rows
from kvedit.reports.lifelong_report import write_lifelong_comparison
from kvedit.runtime import peak_rss_gb

TASKS = SHARED_DATA / "tasks"
CORPUS = [
    "the louvre is a famous landmark and it stands in france",
    "madrid is the capital of spain where spanish is spoken",
    "big ben lies in london which is in england",
]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A five-fact dataset, a statistics corpus, a probe text; a private cache."""
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "facts.json"
    data.write_text(
        json.dumps(
            [
                {
                    "prompt": p,
                    "subject": s,
                    "target_new": n,
                    "target_true": t,
                    "case_id": i,
                    "paraphrase_prompts": [f"{s} lies in"],
                    "neighborhood_prompts": [f"the louvre {i} is located in"],
                }
                for i, (p, s, n, t) in enumerate(FACTS)
            ]
        )
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 60))
    text = tmp_path / "text.txt"
    text.write_text("the eiffel tower is located in the city of paris . " * 40)
    return {"data": data, "corpus": corpus, "text": text}


def _weights(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lifelong(files, general=True, **kw):
    tasks = str(TASKS) if TASKS.is_dir() else None
    return LifelongSettings(
        general_text=str(files["text"]) if general else None,
        general_tasks=tasks if general else None,
        general_tokens=64,
        general_window=16,
        general_per_task=2,
        **kw,
    )


def _ft_values_config(files, settings, n, batch, steps):
    """A sequential FT-values run of the first `n` cases in batches of `batch`, `steps` steps per edit."""
    return BenchConfig(
        dataset=str(files["data"]),
        methods=("ft-values",),
        n=n,
        batch_sizes=(batch,),
        sequential=True,
        extra={"layers": (1,), "max_steps": steps, "lr": 1e-2},
        lifelong=settings,
    )


def _alphaedit_config(files):
    return BenchConfig(
        dataset=str(files["data"]),
        methods=("alphaedit",),
        batch_sizes=(2,),
        sequential=True,
        stats_source=str(files["corpus"]),
        stats_tokens=1000,
        extra={"layers": (1, 2), "nullspace_threshold": 1e-4},
        lifelong=_lifelong(files, general=False, retention_sample=2, specificity_sample=2),
    )


def _stable(records):
    """Records without wall times and memory peaks (which differ run to run)."""
    return [{k: v for k, v in r.items() if k not in ("time_s", "eval_s", "peak_rss_gb")} for r in records]


@pytest.mark.parametrize("kill", ["edit", "commit"])
def test_a_killed_run_resumes_with_its_history_and_equals_an_uninterrupted_one(files, tmp_path, monkeypatch, kill):
    lm = tiny_lm("llama")
    original = _weights(lm)
    config = _alphaedit_config(files)
    whole = tmp_path / "whole"
    Bench(lm, config, whole, progress=False).run()
    assert _same(original, _weights(lm))

    killed = tmp_path / "killed"
    target = (BatchRunner, "edit") if kill == "edit" else (SequentialRun, "_commit")
    real, calls = getattr(*target), []

    def dies_at_batch_2(*args, **kwargs):  # batches 0 and 1 finish; batch 2 dies (editing, or before its commit)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, dies_at_batch_2)
    with pytest.raises(KeyboardInterrupt):
        Bench(lm, config, killed, progress=False).run()
    monkeypatch.setattr(*target, real)
    assert _same(original, _weights(lm))  # the finished batches were reverted too
    folder = run_dir(killed, config.specs()[0])
    done, _ = load_chain(folder)
    assert done == 2 and [p.name for p in folder.glob("history-*")] == ["history-00002.safetensors"]
    assert AlphaEditHistory.load(folder / "history-00002.safetensors").n_edits == 4

    edits = []
    monkeypatch.setattr(BatchRunner, "edit", lambda self, *a, **k: edits.append(1) or real_edit(self, *a, **k))
    Bench(lm, config, killed, progress=False).run()
    assert edits == [1]  # only batch 2 was edited again: 0 and 1 came back from the chain and the history
    assert _same(original, _weights(lm))
    (_, a), (_, b) = (load_chain(run_dir(f, config.specs()[0])) for f in (whole, killed))
    assert a.metadata == b.metadata and _same(a.before, b.before) and _same(a.after, b.after)  # bit for bit
    ha, hb = (
        AlphaEditHistory.load(run_dir(f, config.specs()[0]) / "history-00003.safetensors") for f in (whole, killed)
    )
    assert ha.digest() == hb.digest() and ha.n_edits == 5
    assert _stable(sequence_records(whole)) == _stable(sequence_records(killed))


real_edit = BatchRunner.edit


def test_per_batch_records_equal_a_direct_computation_and_the_chain_reverts_bit_exactly(files, tmp_path):
    lm = tiny_lm("llama")
    original = _weights(lm)
    settings = _lifelong(files, retention_sample=1, specificity_sample=2)
    config = _ft_values_config(files, settings, n=4, batch=2, steps=5)
    out = tmp_path / "seq"
    Bench(lm, config, out, progress=False).run()
    records = sequence_records(out)
    assert [r["batch"] for r in records] == [-1, 0, 1] and [r["n_edited"] for r in records] == [0, 2, 4]
    base, first, last = records
    assert "new" not in base and "retention" not in base and "retention" not in first
    assert {"new", "retention", "specificity", "general", "weights", "time_s", "eval_s"} <= set(last)
    assert set(last["new"]) == {"efficacy", "paraphrase", "specificity"}
    assert 0 < first["peak_rss_gb"] <= last["peak_rss_gb"] <= peak_rss_gb()  # this process's peak, as it grew

    _, chain = load_chain(run_dir(out, config.specs()[0]))
    chain.apply(lm)  # the model after the last batch
    requests = {r.case_id: r for r in load_requests(files["data"])}
    samples = json.loads((out / "state" / "samples.json").read_text())
    earlier = [c for c in samples["order"] if c in (0, 1)][:1]  # retention sample 1: the earlier case of lowest rank
    assert last["retention_cases"] == earlier
    direct = counterfact_case_metrics(lm, [requests[c] for c in earlier])
    assert last["retention"]["efficacy"]["mean"] == 100 * direct[0]["efficacy_success"]
    assert last["retention"]["paraphrase"]["mean"] == 100 * direct[0]["paraphrase_success"]
    unrelated = counterfact_case_metrics(lm, [requests[c] for c in samples["specificity"]])
    assert last["specificity_values"] == [c["neighborhood_success"] for c in unrelated]
    probe = GeneralAbilityProbe.build(lm, files["text"], settings.general_tasks, 64, 16, 2)
    measured = probe.measure(lm)
    assert last["general"]["perplexity"] == measured["perplexity"]
    assert (
        last["general"]["label_accuracy"]["mean"] == 100 * measured["label_accuracy"].get("mean", 0)
        or not TASKS.is_dir()
    )
    relative = weight_change(lm, {n: original[n] for n in chain.names})
    assert {n: w["relative"] for n, w in last["weights"].items()} == relative
    chain.revert(lm)
    assert _same(original, _weights(lm))  # the whole chain reverts bit for bit

    report = write_report(out)
    text = report.read_text()
    assert (out / "collapse.png").is_file() and "## Lifelong editing" in text
    rows = [line for line in (out / "lifelong.md").read_text().splitlines() if line.startswith("| ft-values")]
    assert [row.split(" | ")[1] for row in rows] == ["4"]  # 100, 500, 1000 edits: the nearest batch, once
    assert rows[0].split(" | ")[-1] == f"{last['peak_rss_gb']:.2f} |"  # Peak GB: the largest up to that batch
    compared = write_lifelong_comparison([out, out], tmp_path / "cmp", labels=["a", "b"]).read_text()
    assert "| a | ft-values x2 seq | 4 |" in compared and "| b | ft-values x2 seq | 4 |" in compared


def test_milestones_pick_the_nearest_batch():
    records = [{"batch": i, "n_edited": 10 * (i + 1)} for i in range(100)]
    assert [(m, r["n_edited"]) for m, r in milestone_rows(records)] == [(100, 100), (500, 500), (1000, 1000)]
    assert [r["n_edited"] for _, r in milestone_rows(records[:30])] == [100, 300]


def test_cli_sequential_options_and_refused_changes(files, tiny_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "bench",
        "--model",
        str(tiny_folder),
        "--dataset",
        str(files["data"]),
        "--methods",
        "ft-values",
        "--sequential",
        "--n",
        "2",
        "--out",
        str(out),
        "--retention-sample",
        "1",
        "--general-text",
        str(files["text"]),
        "--no-general-tasks",
        "--general-every",
        "2",
        "--retention-every",
        "2",
        "--general-window",
        "16",
        "--general-tokens",
        "64",
    ]
    assert main(args) == 0
    records = sequence_records(out)
    assert [r["batch"] for r in records] == [-1, 0, 1] and records[-1]["general"]["label_accuracy"] == {}
    assert "general" not in records[1]  # --general-every 2: batches 2, 4, … and the last
    assert "specificity" not in records[1] and "specificity" in records[2]  # --retention-every 2: likewise
    assert main(["report", str(out)]) == 0 and (out / "lifelong.md").is_file()
    capsys.readouterr()
    assert main([*args[:-1], "128", "--n", "3"]) == 2  # a resumed run measures as it began
    assert "general_tokens" in capsys.readouterr().err
    assert main([*args[:10], "--out", str(tmp_path / "x"), "--general-text", str(tmp_path / "absent.txt")]) == 2
    assert "--general-text" in capsys.readouterr().err
    assert Path(out / "state" / "lifelong.json").is_file()


def _seq_record(method, cases, efficacy, paraphrase, specificity):
    return {
        "batch": 0,
        "n_edited": 100,
        "batch_size": 100,
        "method": method,
        "retention_cases": cases,
        "retention_values": {"efficacy": efficacy, "paraphrase": paraphrase},
        "specificity_values": specificity,
    }


def test_runs_are_paired_case_by_case_on_the_folders_samples():
    """Keys − values on retention matches cases by id (the runs list them in different orders), specificity by
    position; hand-computed: efficacy diffs (1, 0, 0), paraphrase (0, −1, −1), specificity (1, 0)."""
    from kvedit.reports.lifelong_pairs import lifelong_pairs, pairs_table

    keys = [{"batch": -1, "n_edited": 0}, _seq_record("ft-keys", [1, 2, 3], [1, 1, 0], [1, 0, 0], [1, 0])]
    values = [{"batch": -1, "n_edited": 0}, _seq_record("ft-values", [3, 1, 2], [0, 0, 1], [1, 1, 1], [0, 0])]
    pairs = lifelong_pairs([("values", "s", "ft-values", values), ("keys", "s", "ft-keys", keys)])
    assert [(p["a"], p["b"]) for p in pairs] == [("keys", "values")]  # A is always the pair's first editor
    row = pairs[0]["rows"][0]
    assert row["n_edited"] == 100
    assert row["efficacy"]["mean_difference"] == pytest.approx(100 / 3)
    assert (row["efficacy"]["wins"], row["efficacy"]["ties"], row["efficacy"]["losses"]) == (1, 2, 0)
    assert row["paraphrase"]["mean_difference"] == pytest.approx(-200 / 3)
    assert row["specificity"]["mean_difference"] == pytest.approx(50.0)
    assert "| keys − values | 100 | +33.3" in pairs_table(pairs)
    # other samples (another data set, --n or seed): nothing is paired
    assert lifelong_pairs([("values", "s", "ft-values", values), ("keys", "t", "ft-keys", keys)]) == []


def test_a_sequential_run_still_going_on_gets_its_lifelong_report(tmp_path):
    """No summary.json yet (the run writes it at the end): `kvedit report` draws what sequence.jsonl holds."""
    out = tmp_path / "running"
    out.mkdir()
    record = _seq_record("ft-keys", [1, 2], [1, 0], [1, 1], [1, 0])
    base = {"run": "ft-keys x100 seq", "layer": 0, "n_batches": 10, "time_s": 1.0, "eval_s": 2.0, "weights": {}}
    lines = [base | {"batch": -1, "n_edited": 0, "specificity": {"mean": 50.0, "ci": [0.0, 100.0]}}]
    lines.append(base | record | {"retention": {"efficacy": {"mean": 50.0, "ci": [0.0, 100.0]}}})
    (out / "sequence.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = write_report(out).read_text()
    assert "in progress" in text and "| ft-keys x100 seq | 100 | 50.0" in text
    assert (out / "lifelong.md").is_file()


def test_retention_every_k_batches_and_a_folder_from_before_the_setting_resumes(files, tmp_path):
    lm = tiny_lm("llama")
    settings = _lifelong(files, general=False, retention_sample=2, specificity_sample=1, retention_every=2)
    config = _ft_values_config(files, settings, n=3, batch=1, steps=2)
    out = tmp_path / "seq"
    stored = out / "state" / "lifelong.json"
    check_settings(stored, settings)
    old = json.loads(stored.read_text())
    del old["retention_every"]  # as written before the setting existed
    stored.write_text(json.dumps(old))
    with pytest.raises(BenchError, match="retention_every: 1 vs 2"):  # it was 1 then: not the same runs
        check_settings(stored, settings)
    check_settings(stored, replace(settings, retention_every=1))  # the default: the folder resumes
    stored.unlink()
    Bench(lm, config, out, progress=False).run()
    records = {r["batch"]: r for r in sequence_records(out)}
    assert [b for b in records if "retention" in records[b]] == [1, 2]  # the 2nd batch and the last
    assert [b for b in records if "specificity" in records[b]] == [-1, 1, 2]
    assert all("new" in records[b] for b in (0, 1, 2))  # the new batch is scored after every batch


def test_lifelong_script_runs_one_stage_and_method_and_reports(tiny_folder, tmp_path):
    """benchmarks/lifelong.sh with STAGES and METHODS runs that one sequential run (the first 3 CounterFact cases in
    batches of 10 on a tiny model, general ability on a small slice) and writes its report."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lifelong.sh"
    env = os.environ | {
        "KVEDIT": str(Path(sys.executable).parent / "kvedit"),
        "STAGES": "cf:10",
        "METHODS": "ft-keys",
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "lifelong"
    small = ["--general-tokens", "256", "--general-window", "64", "--general-per-task", "2", "--retention-sample", "2"]
    done = subprocess.run(
        ["bash", str(script), str(tiny_folder), str(out), "3", "--", *small, "--specificity-sample", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = sequence_records(out / "cf-x10")
    assert {r["run"] for r in records} == {"ft-keys x10 seq"} and [r["batch"] for r in records] == [-1, 0]
    assert records[-1]["general"]["perplexity"] > 0
    cases = [json.loads(line) for line in (out / "cf-x10" / "cases.jsonl").read_text().splitlines()]
    assert sorted({c["case_id"] for c in cases}) == sorted(
        r.case_id for r in load_requests(SHARED_DATA / "editing/counterfact/counterfact-edit-1k.json", limit=3)
    )
    assert (out / "cf-x10" / "lifelong.md").is_file() and not (out / "zsre-x10").exists()
