"""Adapter targets by role: every family, exact modules, hand-counted trainable parameters, clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from kvedit.models import ARCHITECTURES
from kvedit.tuning.targets import (
    adapted_modules,
    adapter_config,
    attach_adapter,
    detach_adapter,
    lora_parameter_count,
    parameter_counts,
    parse_targets,
    role_modules,
)

# Written out by hand from each family's module names (not read from the architecture table).
EXPECTED = {
    "gpt2": {"attn-qv": ["attn.c_attn"], "key": ["mlp.c_fc"], "keys": ["mlp.c_fc"], "values": ["mlp.c_proj"]},
    "gptj": {
        "attn-qv": ["attn.q_proj", "attn.v_proj"],
        "key": ["mlp.fc_in"],
        "keys": ["mlp.fc_in"],
        "values": ["mlp.fc_out"],
    },
    "gpt_neox": {
        "attn-qv": ["attention.query_key_value"],
        "key": ["mlp.dense_h_to_4h"],
        "keys": ["mlp.dense_h_to_4h"],
        "values": ["mlp.dense_4h_to_h"],
    },
    "opt": {"attn-qv": ["self_attn.q_proj", "self_attn.v_proj"], "key": ["fc1"], "keys": ["fc1"], "values": ["fc2"]},
    "bert": {
        "attn-qv": ["attention.self.query", "attention.self.value"],
        "key": ["intermediate.dense"],
        "keys": ["intermediate.dense"],
        "values": ["output.dense"],
    },
}
LLAMA_ROLES = {
    "attn-qv": ["self_attn.q_proj", "self_attn.v_proj"],
    "key-gate": ["mlp.gate_proj"],
    "key-up": ["mlp.up_proj"],
    "keys": ["mlp.gate_proj", "mlp.up_proj"],
    "values": ["mlp.down_proj"],
}
EXPECTED |= {
    family: LLAMA_ROLES
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")
}
LAYER_LISTS = {
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "bert": "bert.encoder.layer",
}

# LoRA r=8 parameters per layer, r × (in + out), from the tiny configs: d_model 32, d_ff 64; GPT-2/NeoX fused
# q/k/v 32 → 96; Llama-like v_proj 32 → 16 (2 key-value heads × head dim 8).
R8_PER_LAYER = {
    "gpt2": {"attn-qv": 8 * (32 + 96), "keys": 8 * (32 + 64), "values": 8 * (64 + 32)},
    "gpt_neox": {"attn-qv": 8 * (32 + 96), "keys": 8 * (32 + 64), "values": 8 * (64 + 32)},
    "gptj": {"attn-qv": 8 * (32 + 32) * 2, "keys": 8 * (32 + 64), "values": 8 * (64 + 32)},
    "opt": {"attn-qv": 8 * (32 + 32) * 2, "keys": 8 * (32 + 64), "values": 8 * (64 + 32)},
    "llama": {
        "attn-qv": 8 * (32 + 32) + 8 * (32 + 16),
        "keys": 2 * 8 * (32 + 64),
        "values": 8 * (64 + 32),
        "key-up": 8 * (32 + 64),
        "attn-qv+values": 8 * (32 + 32) + 8 * (32 + 16) + 8 * (64 + 32),
    },
}

_MODELS: dict[str, object] = {}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny(family)
    return _MODELS[family]


def layers_path(family: str) -> str:
    return LAYER_LISTS.get(family, "model.layers")


def test_every_family_of_the_table_is_covered():
    assert set(EXPECTED) == set(ARCHITECTURES)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_role_hits_exactly_its_modules(family):
    lm = model(family)
    assert set(role_modules(lm)) == set(EXPECTED[family])
    for role, rels in EXPECTED[family].items():
        targets = parse_targets(lm, role, layers=[1, 2])
        wanted = {f"{layers_path(family)}.{layer}.{rel}" for layer in (1, 2) for rel in rels}
        assert set(targets.modules) == wanted
        injected = inject_adapter_in_model(adapter_config(lm, targets), _fresh(family))
        hit = {name for name, m in injected.named_modules() if isinstance(m, BaseTunerLayer)}
        assert hit == wanted, role


def _fresh(family: str):
    return tiny(family).model


@pytest.mark.parametrize("family", sorted(R8_PER_LAYER))
def test_trainable_count_equals_hand_count(family):
    lm = model(family)
    before = {n: p.detach().clone() for n, p in lm.model.state_dict().items()}
    for spec, per_layer in R8_PER_LAYER[family].items():
        targets = parse_targets(lm, spec, layers=[0, 3])
        peft_model = attach_adapter(lm, targets, rank=8)
        trainable, total = parameter_counts(peft_model)
        assert trainable == 2 * per_layer == lora_parameter_count(lm, targets, 8), spec
        assert {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters() if p.requires_grad} == {
            f"{m}.lora_{ab}.default.weight" for m in targets.modules for ab in "AB"
        }
        assert sorted(adapted_modules(peft_model)) == sorted(targets.modules)
        lm.model = detach_adapter(peft_model)
    after = lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_ia3_scales_key_outputs_and_value_inputs():
    lm = model("llama")
    targets = parse_targets(lm, "keys+values", layers=[2])
    peft_model = attach_adapter(lm, targets, adapter="ia3")
    try:
        trainable, _ = parameter_counts(peft_model)
        # gate and up: one scale per output (64 each); down_proj is a feed-forward module: one per input (64)
        assert trainable == 64 + 64 + 64
    finally:
        lm.model = detach_adapter(peft_model)


def test_combinations_negative_layers_and_fused_attention_note():
    gpt2 = model("gpt2")
    assert parse_targets(gpt2, "values", [-1]).modules == ("transformer.h.3.mlp.c_proj",)
    combo = parse_targets(gpt2, "attn-qv+values")
    assert combo.relative == ("attn.c_attn", "mlp.c_proj") and len(combo.modules) == 2 * 4
    assert combo.notes and "fused" in combo.notes[0]
    assert parse_targets(model("llama"), "keys").notes == ()


@pytest.mark.parametrize(
    "spec, layers, message",
    [
        ("key-gate", None, "valid roles: attn-qv, key, keys, values"),
        ("attn-qv+bogus", None, "no role ['bogus']"),
        ("", None, "empty"),
        ("values+values", None, "twice"),
        ("values", [4], "layers 0..3"),
        ("values", [-5], "layers 0..3"),
    ],
)
def test_bad_targets_are_clear_errors(spec, layers, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_targets(model("gpt2"), spec, layers)
