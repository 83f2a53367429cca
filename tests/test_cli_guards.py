"""What every command checks before it works: `--out`, methods, targets, pairs, task files; what an interrupt
says; and that help and argument errors answer without loading torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import leaf_parsers

from kvedit.cli import build_parser, main
from kvedit.cli.folders import MARK

FIXTURES = Path(__file__).parent / "fixtures"
TUNE_QUIET = ["--threads", "1", "--eval-batch-size", "2", "--steps", "1", "--train-n", "2", "--test-n", "2"]


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


def parse_error(capsys, *argv: object) -> str:
    """The message of an argument error (argparse exits 2 while parsing, before any work)."""
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --out ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "triggers", "--tokens", "50"],
        ["analyze", "values"],
        ["analyze", "layers"],
        ["inspect", "The capital of France is"],
        ["compare", "somewhere"],
        ["tune", "--tasks", "cb"],
        ["bench", "--dataset", "counterfact"],
        ["demo"],
    ],
)
def test_out_naming_an_existing_file_is_refused_before_any_work(capsys, tmp_path, argv):
    existing = tmp_path / "results.txt"
    existing.write_text("mine\n")
    err = parse_error(capsys, *argv, "--model", tmp_path / "no-such-model", "--out", existing)
    assert f"{existing} is an existing file" in err and "Traceback" not in err
    assert existing.read_text() == "mine\n"


def test_a_folder_another_command_wrote_is_refused(capsys, tiny_folder, tmp_path):
    analyses = tmp_path / "analyses"
    assert run("analyze", "values", "--model", tiny_folder, "--layers", "0", "--out", analyses) == 0
    assert json.loads((analyses / MARK).read_text())["kind"] == "analyze"
    for argv in (["tune", "--tasks", "cb"], ["bench", "--dataset", "counterfact"], ["compare", "x"]):
        err = parse_error(capsys, *argv, "--out", analyses)
        assert "holds the results of `kvedit analyze`" in err
    # inspect may write beside the analyses it reads; analyze adds to its own folder
    assert run("inspect", "a b", "--model", tiny_folder, "--top", "2", "--out", analyses) == 0
    assert (analyses / "inspect.md").is_file()
    capsys.readouterr()


def test_folders_from_before_the_mark_are_recognised_by_their_files(capsys, tmp_path):
    old_tune = tmp_path / "old-tune"
    (old_tune / "runs" / "untuned").mkdir(parents=True)
    (old_tune / "predictions.jsonl").write_text("")
    err = parse_error(capsys, "bench", "--dataset", "counterfact", "--out", old_tune)
    assert "holds the results of `kvedit tune`" in err


def test_a_command_that_fails_before_writing_leaves_no_folder(capsys, tmp_path):
    out = tmp_path / "never"
    assert run("analyze", "values", "--model", tmp_path / "no-such-model", "--out", out) == 2
    assert not out.exists()
    capsys.readouterr()


# values that were accepted silently -----------------------------------------------------------------------------


def test_tune_with_no_target_set_is_refused(capsys, tiny_folder, tmp_path):
    out = tmp_path / "t"
    assert (
        run(
            "tune",
            "--model",
            tiny_folder,
            "--tasks",
            "cb",
            "--data-dir",
            FIXTURES / "tuning",
            "--targets",
            "",
            "--out",
            out,
            *TUNE_QUIET,
        )
        == 2
    )
    assert "names no target set" in capsys.readouterr().err
    assert not out.exists()


def test_compare_with_pairs_no_folder_has_is_refused(capsys, tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    stored = {
        "a": "ft-keys",
        "b": "ft-values",
        "metric": "paraphrase_success",
        "mean_difference": 2.0,
        "ci": [0.5, 3.5],
        "sign_test_p": 0.2,
        "wins": 3,
        "losses": 1,
        "ties": 6,
        "count": 10,
    }
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "suite": "counterfact",
                "model": "m",
                "comparisons": [stored],
                "runs": {"ft-keys": {"metrics": {}, "n": 10}, "ft-values": {"metrics": {}, "n": 10}},
            }
        )
    )
    out = tmp_path / "cmp"
    assert run("compare", folder, "--out", out, "--pairs", "bogus:x") == 2
    err = capsys.readouterr().err
    assert "no folder has a run named 'bogus', 'x'" in err and "'ft-keys', 'ft-values'" in err
    assert not out.exists()
    assert run("compare", folder, "--out", out, "--pairs", "ft-keys:ft-values") == 0
    capsys.readouterr()


def test_an_unknown_method_is_an_argument_error(capsys):
    err = parse_error(capsys, "bench", "--dataset", "counterfact", "--methods", "ft-keys,rome2", "--out", "x")
    assert "unknown method 'rome2'" in err and "memit" in err


def test_method_names_are_the_registrys():
    from kvedit.editing.method_names import METHOD_NAMES
    from kvedit.editing.registry import METHODS

    assert METHOD_NAMES == tuple(METHODS)


# task files ------------------------------------------------------------------------------------------------------


def _task(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_utf8_csv_with_a_byte_order_mark_reads_as_without(tmp_path):
    from kvedit.tuning.records import read_records

    text = 'text,label\n"Caf\u00e9 au lait, hot",pos\nCold,neg\n'
    with_bom = read_records(_task(tmp_path, "bom.csv", b"\xef\xbb\xbf" + text.encode()))
    assert with_bom == read_records(_task(tmp_path, "plain.csv", text.encode()))
    assert with_bom[0] == {"text": "Caf\u00e9 au lait, hot", "label": "pos"}


def test_a_latin1_file_is_refused_with_file_line_and_encoding(tmp_path):
    from kvedit.data.textfiles import TextFileError
    from kvedit.tuning.records import read_records

    path = _task(tmp_path, "latin1.csv", "text,label\nok,pos\nCaf\u00e9,neg\n".encode("latin-1"))
    with pytest.raises(TextFileError, match=r"latin1.csv line 3, column 4: byte 0xe9 is not UTF-8"):
        read_records(path)


def test_label_words_that_match_no_record_list_the_files_labels(capsys, tiny_folder, tmp_path):
    out = tmp_path / "t"
    assert (
        run(
            "tune",
            "--model",
            tiny_folder,
            "--task-file",
            FIXTURES / "tuning" / "user_task.csv",
            "--template",
            "the {review} is",
            "--label-field",
            "stars",
            "--label-words",
            "bad,good",
            "--targets",
            "values",
            "--out",
            out,
            *TUNE_QUIET,
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no record's 'stars' is one of the --label-words values ['bad', 'good']" in err
    assert "'5', '1'" in err


def test_task_name_names_the_users_task(capsys, tiny_folder, tmp_path):
    out = tmp_path / "t"
    assert (
        run(
            "tune",
            "--model",
            tiny_folder,
            "--task-file",
            FIXTURES / "tuning" / "user_task.csv",
            "--task-name",
            "sentiment",
            "--template",
            "the {review} is",
            "--label-field",
            "stars",
            "--label-words",
            "1=paris,5=rome",
            "--targets",
            "values",
            "--no-untuned",
            "--out",
            out,
            *TUNE_QUIET,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]["values"]["tasks"]) == ["sentiment"]
    assert "sentiment" in (out / "table.md").read_text()
    capsys.readouterr()


# interrupts ------------------------------------------------------------------------------------------------------


def test_an_interrupted_tune_says_what_was_kept_and_how_to_resume(capsys, tiny_folder, tmp_path, monkeypatch):
    from kvedit.tuning import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_tune", interrupted)
    assert (
        run(
            "tune",
            "--model",
            tiny_folder,
            "--tasks",
            "cb",
            "--data-dir",
            FIXTURES / "tuning",
            "--out",
            tmp_path / "t",
            *TUNE_QUIET,
        )
        == 130
    )
    err = capsys.readouterr().err
    assert "last checkpoint" in err and "run the same command again to resume" in err
    assert "weights were restored" not in err


# every command: --threads, and help without torch ---------------------------------------------------------------


def test_every_command_takes_threads():
    parser, _ = build_parser()
    leaves = list(leaf_parsers(parser))
    assert len(leaves) >= 17
    for leaf in leaves:
        assert any("--threads" in a.option_strings for a in leaf._actions), leaf.prog


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["edit", "--help"],
        ["analyze", "triggers", "--help"],
        ["bench", "--dataset", "x", "--out", "y", "--methods", "nope"],
        ["edit", "--prompt", "{} is", "--subject", "s"],
    ],
)
def test_help_and_argument_errors_load_neither_torch_nor_transformers(argv):
    code = (
        "import sys\nfrom kvedit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY [] CODE"), (last, done.stderr[-2000:])
    assert last.endswith("CODE 0" if argv[-1] == "--help" else "CODE 2")


def test_tune_prints_no_warning_from_peft_wrapping_the_model(tiny_folder, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            run(
                "tune",
                "--model",
                tiny_folder,
                "--tasks",
                "cb",
                "--data-dir",
                FIXTURES / "tuning",
                "--targets",
                "values",
                "--no-untuned",
                "--out",
                tmp_path / "t",
                *TUNE_QUIET,
            )
            == 0
        )
    assert not [w for w in caught if "checkpointing" in str(w.message)]
