"""One path for settings: overrides filtered once, checked once, and every editor's model rows in the preset tables."""

from __future__ import annotations

import pytest
from helpers import tiny

from kvedit import EditRequest
from kvedit.editing import presets
from kvedit.editing.finetune import FTHyperParams, default_layers
from kvedit.editing.registry import METHODS, chosen_for_model, edit, get_method, make_settings
from kvedit.models.lm import LM
from kvedit.tuning.presets import TrainConfig

REQUEST = EditRequest("{} is located in the city of", "the eiffel tower", target_new="rome", target_true="paris")

#: fine-tuning's per-model rows and family depths as finetune.py held them (FT_MODEL_SETTINGS, FT_DEFAULT_DEPTH)
#: before they moved into the preset tables
OLD_FT_MODEL_SETTINGS = {
    "smollm2": {"keys": {"layers": (0,), "lr": 5e-4}, "values": {"layers": (3,), "lr": 2e-3}},
    "gemma3-270m": {"keys": {"layers": (2,), "lr": 1.25e-4}, "values": {"layers": (1,), "lr": 2.5e-4}},
}
OLD_FT_DEFAULT_DEPTH = {
    "llama": 0.1,
    "mistral": 0.1,
    "qwen2": 0.1,
    "qwen3": 0.1,
    "gpt2": 0.0,
    "gptj": 0.0,
    "gpt_neox": 0.1,
    "opt": 0.1,
    "bert": 0.5,
    "gemma": 0.1,
    "gemma2": 0.1,
    "gemma3_text": 0.1,
    "olmo": 0.1,
    "olmo2": 0.1,
}
MODEL_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "gemma-3-270m-q4_k_m"}


def test_only_none_is_dropped_from_the_overrides():
    given = presets.given_overrides({"lr": None, "layers": (), "max_steps": 0, "stop_nll": 0.0, "flag": False})
    assert given == {"layers": (), "max_steps": 0, "stop_nll": 0.0, "flag": False}
    assert TrainConfig().replace(lr=None, rank=4) == TrainConfig(rank=4)  # adapter tuning follows the same rule


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_none_override_keeps_the_preset_value(method):
    smol = tiny("llama")
    smol = LM.wrap(smol.model, smol.tokenizer, name=MODEL_NAMES["smollm2"])  # a model with rows of its own
    unset = dict(preset=None, layers=None, lr=None, max_steps=None)
    assert make_settings(None, method, **unset) == make_settings(None, method)
    assert get_method(method).make_hparams(smol, **unset) == get_method(method).make_hparams(smol)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_unknown_setting_is_refused_naming_it(method):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['no_such_setting'\]"):
        make_settings(None, method, no_such_setting=1)


def test_edit_uses_the_settings_make_settings_returned_without_checking_them_again(monkeypatch):
    lm = tiny("llama")
    checks = []
    original = FTHyperParams.validate

    def counted(self: FTHyperParams, model: LM | None) -> FTHyperParams:
        checks.append(model)
        return original(self, model)

    monkeypatch.setattr(FTHyperParams, "validate", counted)
    settings = make_settings(lm, "ft-values", max_steps=1)
    assert len(checks) == 1
    delta = edit(lm, REQUEST, "ft-values", hparams=settings)
    assert len(checks) == 1 and delta.metadata["hparams"]["layers"] == settings.layers
    delta.revert(lm)
    edit(lm, REQUEST, "ft-values", max_steps=1).revert(lm)  # from overrides: made (and checked) once, in edit
    assert len(checks) == 2


@pytest.mark.parametrize("row", sorted(OLD_FT_MODEL_SETTINGS))
def test_fine_tuning_takes_its_model_rows_from_the_preset_table(row):
    base = tiny("llama")
    named = LM.wrap(base.model, base.tokenizer, name=MODEL_NAMES[row])
    assert presets.model_row(named) == row
    for target, chosen in OLD_FT_MODEL_SETTINGS[row].items():
        assert dict(presets.FT_MODEL_PRESETS[target][row]) == chosen
        method = f"ft-{target}"
        settings = make_settings(named, method)
        assert (settings.layers, settings.lr, settings.preset) == (chosen["layers"], chosen["lr"], "default")
        assert chosen_for_model(named, method) and not chosen_for_model(base, method)
        assert make_settings(named, method, preset="default").lr == 2e-3  # a named preset keeps its own settings
    assert {t: set(rows) for t, rows in presets.FT_MODEL_PRESETS.items()} == {
        t: {r for r, targets in OLD_FT_MODEL_SETTINGS.items() if t in targets} for t in ("keys", "values")
    }
    for method in ("ft-key-gate", "ft-key-up"):  # no rows chosen for a single key module
        assert not chosen_for_model(named, method) and make_settings(named, method).lr == 2e-3


def test_fine_tuning_takes_its_family_layer_from_the_preset_table():
    assert dict(presets.FT_FAMILY_DEPTH) == OLD_FT_DEFAULT_DEPTH
    for family in ("llama", "gpt2"):
        lm = tiny(family)
        expected = (round(OLD_FT_DEFAULT_DEPTH[family] * (lm.num_layers - 1)),)
        assert default_layers(lm) == expected == make_settings(lm, "ft-keys").layers


def test_a_bfloat16_compute_model_is_refused_by_the_float32_only_editors():
    """KN and T-Patcher run in float32 whatever lm.compute_dtype says: asking them for bfloat16 is an error that
    names the editors that follow it, never a silent float32 run."""
    lm = tiny("llama")
    lm.compute_dtype = "bfloat16"  # as --compute-dtype bfloat16 sets it (no bf16 pass runs here)
    only_float32 = sorted(name for name, m in METHODS.items() if not m.follows_compute_dtype)
    assert only_float32 == ["kn", "t-patcher"]
    for name in only_float32:
        with pytest.raises(ValueError, match=f"{name} runs in float32 only.*ft-keys"):
            make_settings(lm, name)
    assert make_settings(lm, "ft-keys").layers  # the editors that follow it are unaffected
    lm.compute_dtype = "float32"
    assert make_settings(lm, "kn") is not None
