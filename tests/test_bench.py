"""`kvedit bench` and `kvedit report` on a tiny model: files written, resume after a kill, the
known-fact filter, sequential runs, restored weights, and clear errors."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest
from helpers import FACTS, ZSRE_RECORD, same, snapshot, write_facts, write_zsre

import kvedit.bench.runner as batch_runner_module
from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import (
    BenchError,
    load_cases_file,
)
from kvedit.bench.harness import Bench
from kvedit.cli import main
from kvedit.data.download import download, resolve_dataset
from kvedit.data.loaders import DatasetError, load_requests
from kvedit.evaluation import target_nll
from kvedit.evaluation.known import known_filter


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


def test_the_unedited_pass_keeps_every_finished_chunk_after_a_kill(tiny_llama, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    bench = Bench(tiny_llama, BenchConfig(dataset=str(dataset), methods=("ft-keys",), n=4), out, progress=False)
    real, calls = bench.runner.evaluate, []

    def evaluate_then_die(cases):
        calls.append([c.case_id for c in cases])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second chunk
        return real(cases)

    monkeypatch.setattr(bench.runner, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench._evaluate_unedited(bench.cases, chunk=2)
    assert calls == [[0, 1], [2, 3]]
    records = load_cases_file(out / "cases.jsonl")
    assert [(r["run"], r["case_id"]) for r in records] == [("unedited", 0), ("unedited", 1)]


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
    zsre = write_zsre(tmp_path / "zsre.json")
    with pytest.raises(BenchError, match="target_true"):
        Bench(tiny_llama, BenchConfig(dataset=str(zsre), methods=("ft-keys",), known_only=True), tmp_path / "z")
    with pytest.raises(DatasetError, match="neither a file nor an official name"):
        resolve_dataset("no-such-dataset")


def test_zsre_bench_reports_token_accuracy(tiny_llama, tmp_path):
    zsre = write_zsre(tmp_path / "zsre.json")
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
    records = [ZSRE_RECORD]
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
