"""Named hyperparameter presets: pick the one for a model's family, apply overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from ..models.lm import LM


#: The closed-form editors' preset for each model_type without one of its own (gated pre-norm families
#: take the Llama presets, the post-norm Gemma/OLMo-2 rows included); anything else starts from GPT-2 XL's.
FAMILY_PRESETS: Mapping[str, str] = MappingProxyType({
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "gemma2": "llama", "gemma3_text": "llama", "olmo": "llama", "olmo2": "llama", "gptj": "gpt-j",
    "gpt_neox": "gpt-neox",
})

#: Presets chosen for one model ahead of its family's (benchmarks/select_presets.py): a part of the model's
#: name (lower case) -> the preset row, used where the method's table has that row.
MODEL_PRESETS: Mapping[str, str] = MappingProxyType({"smollm2-135m": "smollm2", "gemma-3-270m": "gemma3-270m"})


def frozen_presets(presets: dict[str, dict[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    """A preset table that cannot change at run time (each row read-only, no row shared)."""
    return MappingProxyType({name: MappingProxyType(dict(row)) for name, row in presets.items()})


def make_hparams(cls: type, presets: Mapping[str, Mapping[str, Any]], preset: str | None, lm: LM | None, **overrides: Any):
    """Build `cls` from a named preset (default: the one matching the model) and overrides."""
    if preset is None or preset == "default":
        preset = default_preset(lm, presets)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; expected some of {sorted(known)}")
    values = {**presets[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if "layers" in values and values["layers"] is not None:
        values["layers"] = tuple(values["layers"])
    return cls(preset=preset, **values)


def default_preset(lm: LM | None, presets: Mapping[str, Mapping[str, Any]]) -> str:
    """The preset chosen for this model if the table has one (MODEL_PRESETS), else its family's
    (FAMILY_PRESETS), else GPT-2 XL's; a table without those rows (one preset for every model) gives its first."""
    if lm is None:
        return next(iter(presets))
    row = model_row(lm)
    if row is not None and row in presets:
        return row
    family = FAMILY_PRESETS.get(lm.model.config.model_type, "gpt2-xl")
    return family if family in presets else next(iter(presets))


def model_row(lm: LM | None) -> str | None:
    """The name of the preset rows chosen for this very model (MODEL_PRESETS), or None."""
    name = lm.name.lower() if lm is not None else ""
    return next((row for part, row in MODEL_PRESETS.items() if part in name), None)
