"""Named hyperparameter presets: pick the rows for a model, apply the settings a caller gave.

Every editor's settings come from one path: `given_overrides` drops the overrides that mean "the preset's
value" (None), `make_hparams` lays them over the preset row chosen for the model (`default_preset`) and, for
fine-tuning, over the row chosen for this very model (`FT_MODEL_PRESETS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..models.lm import LM
    from .hparams import EditorSettings

    S = TypeVar("S", bound=EditorSettings)

#: a preset table: row name -> the settings it sets
PresetTable = Mapping[str, Mapping[str, Any]]

#: The closed-form editors' preset for each model_type without one of its own (gated pre-norm families
#: take the Llama presets, the post-norm Gemma/OLMo-2 rows included); anything else starts from GPT-2 XL's.
FAMILY_PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "llama": "llama",
        "mistral": "llama",
        "qwen2": "llama",
        "qwen3": "llama",
        "gemma": "llama",
        "gemma2": "llama",
        "gemma3_text": "llama",
        "olmo": "llama",
        "olmo2": "llama",
        "gptj": "gpt-j",
        "gpt_neox": "gpt-neox",
    }
)

#: Presets chosen for one model ahead of its family's (benchmarks/select_presets.py): a part of the model's
#: name (lower case) -> the preset row, used where the method's table has that row.
MODEL_PRESETS: Mapping[str, str] = MappingProxyType({"smollm2-135m": "smollm2", "gemma-3-270m": "gemma3-270m"})


def frozen_presets(presets: Mapping[str, Mapping[str, Any]]) -> PresetTable:
    """A preset table that cannot change at run time (each row read-only, no row shared)."""
    return MappingProxyType({name: MappingProxyType(dict(row)) for name, row in presets.items()})


#: Fine-tuning's rows chosen for one model (a MODEL_PRESETS row) by benchmarks/select_presets.py
#: (docs/presets.md), per target: edit layer and learning rate, laid over the "default" preset when no preset
#: is named. SmolLM2: 35 settings per target (7 layers × 5 learning rates) on 50 tuning cases, keys 100/76/64
#: (Score 77.4), values 100/74/64 (76.7, the layer grid's choice before the learning rates joined it).
#: Gemma-3-270M: 30 settings per target on 50 tuning cases, keys 100/82/68 (81.3), values 100/88/64 (81.1).
FT_MODEL_PRESETS: Mapping[str, PresetTable] = MappingProxyType(
    {
        "keys": frozen_presets(
            {"smollm2": {"layers": (0,), "lr": 5e-4}, "gemma3-270m": {"layers": (2,), "lr": 1.25e-4}}
        ),
        "values": frozen_presets(
            {"smollm2": {"layers": (3,), "lr": 2e-3}, "gemma3-270m": {"layers": (1,), "lr": 2.5e-4}}
        ),
    }
)

#: Fine-tuning's default edit layer as a fraction of depth, per model_type (its family row; 0.1 for any
#: other); 0.0 is ROME's FT baseline layer.
FT_FAMILY_DEPTH: Mapping[str, float] = MappingProxyType(
    {
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
)


def given_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a caller gave: an override of None means "the preset's value" and is dropped.

    The one place this rule lives; every path from overrides to settings goes through it."""
    return {name: value for name, value in overrides.items() if value is not None}


def make_hparams(
    cls: type[S],
    presets: PresetTable,
    preset: str | None,
    lm: LM | None,
    *,
    model_rows: PresetTable | None = None,
    **given: Any,
) -> S:
    """Build `cls` from a named preset (default: the one matching the model), the row of `model_rows` chosen
    for this very model (only when no preset is named) and the settings `given` (no None: `given_overrides`)."""
    named = preset
    if preset is None or preset == "default":
        preset = default_preset(lm, presets)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    known = {f.name for f in fields(cls)}
    unknown = set(given) - known
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; expected some of {sorted(known)}")
    chosen = model_preset(lm, model_rows) if named is None and model_rows is not None else {}
    values = {**presets[preset], **chosen, **given}
    if values.get("layers") is not None:
        values["layers"] = tuple(values["layers"])
    return cls(**{**values, "preset": preset})


def default_preset(lm: LM | None, presets: PresetTable) -> str:
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


def model_preset(lm: LM | None, table: PresetTable) -> Mapping[str, Any]:
    """The row of `table` chosen for this very model (its MODEL_PRESETS row), or an empty one."""
    return table.get(model_row(lm) or "", {})


def ft_model_presets(target: str) -> PresetTable:
    """Fine-tuning's rows chosen per model for `target` (FT_MODEL_PRESETS; none for key:gate, key:up)."""
    return FT_MODEL_PRESETS.get(target, MappingProxyType({}))
