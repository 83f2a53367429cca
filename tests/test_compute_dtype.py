"""Issue 30: the compute precision of the editors' inner loops (`models/compute.py`), batched target optimisation.

Tiny models throughout: bfloat16 compute is exercised with the matrix-unit detection monkeypatched where the CPU
has none (torch then emulates bf16, slowly but correctly)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import leaf_parsers, snapshot
from tiny_models import tiny_lm

import kvedit.models.compute as compute
from kvedit import EditRequest, edit
from kvedit.cli import build_parser, main
from kvedit.editing.context import MEMIT_TEMPLATES, context_templates
from kvedit.editing.targets import TargetOptions, optimize_targets
from kvedit.models.compute import Bf16Support, ComputeDtypeError, compute_view, set_compute_dtype

REQUESTS = [
    EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris"),
    EditRequest("{} is the capital of", "berlin", target_new="spain", target_true="germany"),
    EditRequest("{} is the capital of", "rome", target_new="france", target_true="italy"),
    EditRequest("{} plays the", "the pianist", target_new="violin", target_true="piano"),
    EditRequest("{} speaks", "the diplomat", target_new="french", target_true="german"),
]
SENTENCE = "the eiffel tower is located in the city of paris and rome is the capital of italy"
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = "\n\n".join(SENTENCE for _ in range(200))


@pytest.fixture
def bf16_units(monkeypatch):
    """Pretend the CPU has bfloat16 matrix units."""
    monkeypatch.setattr(compute, "bf16_support", lambda device="cpu": Bf16Support(True, "pretended for the test"))


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setattr(compute, "bf16_support", lambda device="cpu": Bf16Support(False, "CPU: no AMX-BF16 (test)"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_targets_equal_one_at_a_time_in_float32(family):
    """Five facts in one batched optimisation (requests leaving the batch as they stop) give each fact the δ and
    steps it gets alone, to 1e-5."""
    lm = tiny_lm(family)
    templates = context_templates(lm, MEMIT_TEMPLATES)
    sites = [("residual", 2)]
    opts = TargetOptions(steps=10, lr=0.5, kl_factor=0.01, weight_decay=0.01, clamp_norm_factor=20, early_stop_loss=3.9)
    alone = [optimize_targets(lm, [r], sites, templates, opts, group_size=1) for r in REQUESTS]
    together, steps = optimize_targets(lm, REQUESTS, sites, templates, opts, group_size=len(REQUESTS))
    assert steps == [s[0] for _, s in alone] and len(set(steps)) > 1  # they stop apart: rows leave mid-run
    for (vectors, _), batched in zip(alone, together):
        for site in sites:
            torch.testing.assert_close(batched[site][0], vectors[0][site][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched[site][1], vectors[0][site][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rome", "memit", "pmet", "ft-keys", "ft-values"])
def test_a_patch_made_in_bfloat16_compute_reverts_bit_exactly(corpus, bf16_units, method):
    lm = set_compute_dtype(tiny_lm("llama"), "bfloat16")
    original = snapshot(lm)
    layers = (1,) if method in ("rome", "ft-keys", "ft-values") else (1, 2)
    requests = REQUESTS[:1] if method == "rome" else REQUESTS[:2]
    extra = {} if method.startswith("ft-") else dict(stats_source=corpus, stats_tokens=1000)
    delta = edit(lm, requests, method, layers=layers, **extra)
    assert delta.metadata["compute_dtype"] == "bfloat16"
    assert all(lm.model.get_parameter(n).dtype == torch.float32 for n in delta.names)  # the written weights
    assert any(not torch.equal(original[n], t) for n, t in lm.model.state_dict().items())
    delta.revert(lm)
    assert all(torch.equal(original[n], t) for n, t in lm.model.state_dict().items())
    delta.apply(lm)  # and applies again onto the float32 model exactly as recorded
    assert all(torch.equal(lm.model.get_parameter(n), delta.after[n]) for n in delta.names)


def test_the_bfloat16_view_follows_edits_and_keeps_ties_and_buffers(bf16_units):
    lm = set_compute_dtype(tiny_lm("llama"), "bfloat16")
    view = compute_view(lm)
    assert view is not lm and view.model.dtype == torch.bfloat16 and compute_view(lm) is view  # built once
    assert all(b.dtype == torch.float32 for b in view.model.buffers())  # rotary frequencies stay float32
    assert not any(p.requires_grad for p in view.model.parameters())
    name = f"{lm.values_path(1)}.weight"
    with torch.no_grad():
        lm.model.get_parameter(name).add_(1.0)
    torch.testing.assert_close(
        compute_view(lm).model.get_parameter(name).float(), lm.model.get_parameter(name), rtol=1e-2, atol=1e-2
    )
    assert compute_view(set_compute_dtype(tiny_lm("llama"), "float32")).compute_dtype == "float32"


def test_bfloat16_targets_stay_close_to_float32(bf16_units):
    """The same optimisation in bf16 compute: initial values identical (read in float32), δ close."""
    lm = tiny_lm("llama")
    templates = context_templates(lm, MEMIT_TEMPLATES)
    sites = [("residual", 2)]
    opts = TargetOptions(steps=5, lr=0.5, kl_factor=0.01, weight_decay=0.01, clamp_norm_factor=20, early_stop_loss=0.0)
    f32, _ = optimize_targets(lm, REQUESTS[:2], sites, templates, opts)
    bf16, _ = optimize_targets(set_compute_dtype(lm, "bfloat16"), REQUESTS[:2], sites, templates, opts)
    for a, b in zip(f32, bf16):
        torch.testing.assert_close(b[sites[0]][0], a[sites[0]][0], rtol=1e-5, atol=1e-5)
        assert (b[sites[0]][1] - a[sites[0]][1]).norm() < 0.1 * a[sites[0]][1].norm()


def test_no_bfloat16_units_is_a_clear_error(no_bf16_units, capsys, tiny_folder):
    lm = tiny_lm("llama")
    with pytest.raises(ComputeDtypeError, match="needs bfloat16 matrix units.*no AMX-BF16 \\(test\\).*float32"):
        set_compute_dtype(lm, "bfloat16")
    assert lm.compute_dtype == "float32"
    with pytest.raises(ComputeDtypeError, match="not one of float32, bfloat16"):
        set_compute_dtype(lm, "float16")
    code = main(
        [
            "edit",
            "--model",
            str(tiny_folder),
            "--compute-dtype",
            "bfloat16",
            "--prompt",
            "{} is in",
            "--subject",
            "x",
            "--new",
            "rome",
            "--true",
            "paris",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "needs bfloat16 matrix units" in err and "Traceback" not in err


def test_the_edit_command_runs_in_bfloat16_compute(bf16_units, capsys, tiny_folder, tmp_path):
    patch = tmp_path / "patch.safetensors"
    code = main(
        [
            "edit",
            "--model",
            str(tiny_folder),
            "--compute-dtype",
            "bfloat16",
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
            "--steps",
            "3",
            "--save",
            str(patch),
            "--json",
        ]
    )
    capsys.readouterr()
    assert code == 0
    assert json.loads(patch.with_suffix(".json").read_text())["compute_dtype"] == "bfloat16"


def test_every_command_that_runs_a_model_takes_compute_dtype():
    parser, _ = build_parser()
    with_model = [leaf for leaf in leaf_parsers(parser) if any("--model" in a.option_strings for a in leaf._actions)]
    names = {leaf.prog.split(" ", 1)[1] for leaf in with_model}
    assert {
        "edit",
        "apply",
        "revert",
        "stats",
        "bench",
        "demo",
        "analyze triggers",
        "inspect",
        "tune",
        "explore",
    } <= names
    for leaf in with_model:
        action = next(a for a in leaf._actions if "--compute-dtype" in a.option_strings)
        assert action.default == "float32" and set(action.choices) == {"float32", "bfloat16"}, leaf.prog
        required = [a for a in leaf._actions if a.required]
        positionals = [a for a in required if not a.option_strings]
        try:  # parse the flag alone: the command's other required options are set aside for the check
            for a in required:
                a.required = False
            args = leaf.parse_known_args(["x"] * len(positionals) + ["--compute-dtype", "bfloat16"])[0]
        finally:
            for a in required:
                a.required = True
        assert args.compute_dtype == "bfloat16", leaf.prog
