"""What a careless or hostile user does: bad input, tampered files, interrupted writes. Each test names the
defect it pins down; every one failed before its fix."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import run, tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

import kvedit.editing.delta as delta_module
import kvedit.editing.stats as stats_module
from kvedit import EditRequest, WeightDelta, edit
from kvedit.cli import main
from kvedit.data.loaders import DatasetError, load_requests
from kvedit.editing import METHODS, PatchMismatchError, make_settings
from kvedit.editing.stats import key_statistics

EDIT = ["--prompt", "{} is located in the city of", "--subject", "the eiffel tower", "--new", "rome", "--true", "paris"]
SENTENCE = "the eiffel tower is located in the city of paris and rome is the capital of italy"
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = "\n\n".join(SENTENCE for _ in range(100))


@pytest.fixture
def patch(tmp_path):
    """A saved FT-values patch of a tiny Llama, and the model it was made on (unedited again)."""
    lm = tiny("llama")
    delta = edit(
        lm,
        EditRequest("{} is located in the city of", "the eiffel tower", "rome", "paris"),
        "ft-values",
        layers=(1,),
        max_steps=3,
    )
    delta.revert(lm)
    return delta.save(tmp_path / "p.safetensors"), lm


# ---------------------------------------------------------------- 1. every method from the command line


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_edits_from_the_command_line(capsys, tiny_folder, corpus, tmp_path, method):
    layers = "1" if method.startswith(("ft-", "rome", "t-patcher")) else "1,2"  # one-layer editors
    save = tmp_path / f"{method}.safetensors"
    code, out, err = run(
        "edit",
        "--model",
        str(tiny_folder),
        "--method",
        method,
        *EDIT,
        "--layers",
        layers,
        "--steps",
        "3",
        "--save",
        str(save),
        "--json",
        *(["--stats", str(corpus), "--stats-tokens", "300"] if METHODS[method].uses_statistics else []),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["layers"] == [int(x) for x in layers.split(",")] and result["patch"] == str(save)
    delta = WeightDelta.load(save)
    assert delta.metadata["method"] == method and delta.metadata["layers"] == result["layers"]


def test_rome_without_layers_takes_the_preset_layer():
    settings = make_settings(None, "rome", layers=None, lr=None)
    assert settings.layer is not None  # was: "unknown setting(s) ['layers']"
    lm = tiny("llama")
    assert make_settings(lm, "rome", layers=(-1,)).layer == -1


# ---------------------------------------------------------------- 2. a patch never collides with its metadata


@pytest.mark.parametrize("name, message", [("x.json", "must end in .safetensors"), ("folder", "is a folder")])
def test_save_paths_that_would_lose_the_patch_are_refused_before_editing(capsys, tiny_folder, tmp_path, name, message):
    (tmp_path / "folder.safetensors").mkdir()
    target = tmp_path / ("folder.safetensors" if name == "folder" else name)
    code, out, err = run("edit", "--model", "/does/not/exist", *EDIT, "--save", str(target))
    assert code == 2 and message in err and out == ""  # refused before loading the (missing) model


def test_save_without_suffix_writes_patch_and_metadata_apart(patch, tmp_path):
    path, _ = patch
    delta = WeightDelta.load(path)
    written = delta.save(tmp_path / "eiffel")
    assert written.name == "eiffel.safetensors" and (tmp_path / "eiffel.json").is_file()
    assert WeightDelta.load(written).metadata == delta.metadata


# ---------------------------------------------------------------- 3. a patch's checksum, structure and values


def _data_offset(path) -> int:
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def test_a_flipped_byte_in_the_weights_is_refused_and_nothing_is_written(capsys, patch, tiny_folder, tmp_path):
    path, _ = patch
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    code, _, err = run("apply", str(path), "--model", str(tiny_folder), "--out", str(out))
    assert code == 2 and "damaged" in err and not out.exists()


def test_edited_metadata_is_refused(patch):
    path, _ = patch
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    meta = json.loads(header["kvedit"])
    meta["method"] = "rome"
    save_file(tensors, str(path), metadata=header | {"kvedit": json.dumps(meta)})
    with pytest.raises(PatchMismatchError, match="damaged"):
        WeightDelta.load(path)


def test_non_finite_weights_are_refused_even_with_a_valid_checksum(patch, tmp_path):
    path, _ = patch
    delta = WeightDelta.load(path)
    name = delta.names[0]
    delta.after[name] = delta.after[name].clone()
    delta.after[name][0, 0] = float("nan")
    bad = delta.save(tmp_path / "nan.safetensors")
    with pytest.raises(PatchMismatchError, match="NaN/Inf"):
        WeightDelta.load(bad)


def test_foreign_and_malformed_safetensors_are_clear_errors(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(PatchMismatchError, match="not a kvedit patch"):
        WeightDelta.load(foreign)
    delta = WeightDelta({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)}, {"method": "x"})
    shaped = delta.save(tmp_path / "shape.safetensors")
    with pytest.raises(PatchMismatchError, match="malformed"):
        WeightDelta.load(shaped)


def test_a_mismatch_message_says_what_differs(patch):
    path, lm = patch
    delta = WeightDelta.load(path)
    name = delta.names[0]
    with torch.no_grad():
        lm.model.get_parameter(name)[3, 0] += 1.0
    with pytest.raises(PatchMismatchError, match=r"1 of \d+ elements differ \(rows 3; largest \|difference\| 1"):
        delta.apply(lm)


# ---------------------------------------------------------------- 4. never truncate another command's results


def test_bad_demo_methods_leave_an_existing_folder_untouched(capsys, tiny_folder, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    lines = "".join(json.dumps({"run": "ft-keys", "case_id": i}) + "\n" for i in range(12))
    (out / "cases.jsonl").write_text(lines)
    code, _, err = run("demo", "--methods", "bogus", "--out", str(out), "--model", str(tiny_folder))
    assert code == 2 and "bogus" in err and (out / "cases.jsonl").read_text() == lines
    code, _, err = run("demo", "--n", "1", "--out", str(out), "--model", str(tiny_folder))
    assert code == 2 and "did not write" in err and (out / "cases.jsonl").read_text() == lines


def test_bench_resumes_a_demo_folder_only_with_the_demo_facts(capsys, tiny_folder, tmp_path):
    out = tmp_path / "demo"
    assert run("demo", "--n", "1", "--methods", "ft-values", "--out", str(out), "--model", str(tiny_folder))[0] == 0
    before = (out / "cases.jsonl").read_text()
    data = tmp_path / "facts.json"
    data.write_text(
        json.dumps([{"prompt": "{} is in", "subject": "paris", "target_new": "rome", "target_true": "france"}])
    )
    code, _, err = run("bench", "--dataset", str(data), "--out", str(out), "--model", str(tiny_folder))
    assert code == 2 and "other settings (dataset" in err and (out / "cases.jsonl").read_text() == before


# ---------------------------------------------------------------- 5. cases without ids


def test_records_without_case_id_are_distinct_cases_by_position(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": "{} is in", "subject": s, "target_new": "rome"}) + "\n"
            for s in ("paris", "berlin", "madrid")
        )
    )
    assert [r.case_id for r in load_requests(path)] == [0, 1, 2]
    path.write_text(
        "".join(
            json.dumps({"prompt": "{} is in", "subject": s, "target_new": "rome", "case_id": 7}) + "\n"
            for s in ("paris", "berlin")
        )
    )
    with pytest.raises(DatasetError, match="record 1.*case_id 7 was already used by record 0"):
        load_requests(path)


# ---------------------------------------------------------------- 6. the statistics cache


@pytest.mark.parametrize("damage", ["altered", "missing", "negative"])
def test_a_statistics_cache_with_a_damaged_count_is_recomputed(corpus, kvedit_cache, monkeypatch, damage):
    lm = tiny("llama")
    fresh = key_statistics(lm, [1], str(corpus), 128, seq_len=32, progress=False)[1]
    (path,) = list(kvedit_cache.glob("stats/*/*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta = (
        {k: v for k, v in meta.items() if k != "count"}
        if damage == "missing"
        else meta | {"count": "64" if damage == "altered" else "-5"}
    )
    save_file(load_file(str(path)), str(path), metadata=meta)
    calls = []
    real = stats_module._accumulate
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = tiny("llama")  # a new process's model: nothing held in memory
    again = key_statistics(lm, [1], str(corpus), 128, seq_len=32, progress=False)[1]
    assert calls == [1] and again.count == fresh.count == 128
    assert torch.equal(again.sum_kkT, fresh.sum_kkT)


def test_sampling_the_self_corpus_leaves_the_global_rng_alone(corpus):
    lm = tiny("llama")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(stats_module.corpus_texts(lm, "self"))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- weak spots


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "-1"], "lr must be > 0"),
        (["--preset", "bogus"], "unknown preset"),
        (["--steps", "0"], "max_steps must be >= 1"),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(capsys, extra, message):
    code, _, err = run("edit", "--model", "/does/not/exist", *EDIT, *extra)
    assert code == 2 and message in err


@pytest.mark.parametrize("layers", ["3,3", ",", "1,,2", ""])
def test_malformed_layer_lists_are_refused(capsys, layers):
    with pytest.raises(SystemExit):
        main(["edit", *EDIT, "--layers", layers])
    assert "--layers" in capsys.readouterr().err


def test_layers_help_says_negative_counts_from_the_end(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert "-1 is the last" in capsys.readouterr().out


def test_apply_refuses_the_cache_a_file_and_a_full_folder(capsys, patch, tiny_folder, tmp_path, kvedit_cache):
    path, _ = patch
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for out, message in (
        (kvedit_cache / "models" / "x", "inside kvedit's cache"),
        (tmp_path / "file", "existing file"),
        (full, "not empty"),
    ):
        code, _, err = run("apply", str(path), "--model", str(tiny_folder), "--out", str(out))
        assert code == 2 and message in err
    assert (full / "keep.txt").read_text() == "mine" and not (kvedit_cache / "models").exists()


def test_interrupted_writes_leave_nothing_behind(capsys, patch, tiny_folder, tmp_path, monkeypatch):
    path, _ = patch
    delta = WeightDelta.load(path)

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(delta_module, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        delta.save(tmp_path / "half.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".half", "half"))]

    def disk_full(*args, **kwargs):  # the weights are written, then the tokenizer fails
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    out = tmp_path / "model"
    with pytest.raises(OSError):
        main(["apply", str(path), "--model", str(tiny_folder), "--out", str(out)])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]


def test_bench_keys_resume_on_the_dataset_content(capsys, tiny_folder, tmp_path):
    data = tmp_path / "facts.json"
    record = {
        "prompt": "{} is located in the city of",
        "subject": "the eiffel tower",
        "target_new": "rome",
        "target_true": "paris",
    }
    data.write_text(json.dumps([record]))
    out = tmp_path / "bench"
    args = ["bench", "--dataset", str(data), "--methods", "ft-values", "--out", str(out), "--model", str(tiny_folder)]
    assert run(*args)[0] == 0
    data.write_text(json.dumps([record | {"target_new": "london"}]))
    code, _, err = run(*args)
    assert code == 2 and "content changed" in err


def test_bench_output_errors_name_the_file(capsys, tiny_folder, tmp_path):
    data = tmp_path / "facts.json"
    data.write_text("[]")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    code, _, err = run("bench", "--dataset", str(data), "--out", str(garbage), "--model", "/does/not/exist")
    assert code == 2 and str(garbage / "config.json") in err
    (tmp_path / "file").write_text("x")
    code, _, err = run("bench", "--dataset", str(data), "--out", str(tmp_path / "file"), "--model", "/does/not/exist")
    assert code == 2 and "existing file" in err


def test_context_templates_and_adapters_leave_the_global_rng_alone(tmp_path, monkeypatch, kvedit_cache):
    """Seeded generation (context templates) and seeded adapter init restore the caller's RNG state."""
    from kvedit.editing.context import MEMIT_TEMPLATES, context_templates
    from kvedit.tuning.targets import attach_adapter, detach_adapter, parse_targets

    lm = tiny("llama")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    context_templates(lm, MEMIT_TEMPLATES)
    detach_adapter(attach_adapter(lm, parse_targets(lm, "values")))
    assert torch.equal(torch.rand(3), expected)
