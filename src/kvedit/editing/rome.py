"""ROME (Meng et al. 2022): a rank-one update of one layer's values so that k* maps to v*.

k* is the values-module input at the subject's last token averaged over context templates;
v* = (FFN output there) + δ, with δ optimised so the model predicts target_new. The update
uses the averaged k* on both sides (the r-ROME fix):

    ΔW = (v* − W k*) uᵀ / (uᵀ k*),   u = C⁻¹ k* (mom2_adjustment) or k*

so the edited layer maps k* exactly to v*.

Families with a norm after the FFN (Gemma-2/3, OLMo-2) write `norm(W k)` into the residual. v* is
taken *before* that norm, at the values module's output: δ is added there while it is optimised, so
the loss already sees it through the norm, and the rank-one update, which is linear in W, makes the
values module give v* exactly, so the edited model writes `norm(v*)`, what the optimisation found.
A target behind the norm could not be met by a change of W alone (only points on the norm's image
can be written, and the norm forgets the input's scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.requests import EditRequest
from ..models.devices import float64_device
from ..models.lm import LM, tensor_attr
from .context import ROME_TEMPLATES, context_templates
from .hparams import ClosedFormHyperParams, EditOutcome
from .presets import frozen_presets
from .stats import inverse_mom2
from .targets import TargetPlan, subject_keys


@dataclass(frozen=True)
class ROMEHyperParams(ClosedFormHyperParams):
    """ROME settings: `layers` holds the one edit layer (empty = the family preset's); statistics only
    when mom2_adjustment."""

    layers: tuple[int, ...] = ()
    mom2_adjustment: bool = True

    def edit_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    @property
    def layer(self) -> int:
        return self.layers[0]

    def validate(self, lm: LM | None) -> "ROMEHyperParams":
        super().validate(lm)
        if len(self.layers) > 1:
            raise ValueError(f"ROME edits one layer; got layers {tuple(self.layers)}")
        return self


@dataclass(frozen=True)
class ROMERecord:
    """One request's rank-one edit: the key k* `[d_ff]` and the values module's new output v* `[d_model]`."""

    key: torch.Tensor
    target: torch.Tensor


#: REFERENCE.md §3 presets. "smollm2": layer and δ decay chosen by benchmarks/select_presets.py (docs/presets.md;
#: 10 settings on 50 tuning cases): layer 3, δ decay 0.5 (tied with 1e-3: the smaller edit) scores 98 / 86 / 78.
#: "gemma3-270m" likewise (6 settings): layer 2, δ decay 0.5 (tied with 1e-3) scores 100 / 96 / 80.
ROME_PRESETS: Mapping[str, Mapping[str, Any]] = frozen_presets(
    {
        "gpt2-xl": dict(layers=(17,), max_steps=20, lr=0.5, weight_decay=0.5, mom2_adjustment=True),
        "gpt-j": dict(layers=(5,), max_steps=20, lr=0.5, weight_decay=0.5, mom2_adjustment=True),
        "gpt-neox": dict(layers=(15,), max_steps=20, lr=0.5, weight_decay=0.5, mom2_adjustment=True),
        "llama": dict(layers=(5,), max_steps=25, lr=0.5, weight_decay=1e-3, mom2_adjustment=False),
        "smollm2": dict(layers=(3,), max_steps=25, lr=0.5, weight_decay=0.5, mom2_adjustment=True, stats_tokens=20_000),
        "gemma3-270m": dict(
            layers=(2,), max_steps=25, lr=0.5, weight_decay=0.5, mom2_adjustment=True, stats_tokens=20_000
        ),
    }
)


def rome_prepare(lm: LM, hparams: ROMEHyperParams) -> None:
    """Compute, or load from the cache, what every edit with these settings reuses: the context
    templates and the layer's inverted key statistics (held in memory for the process)."""
    context_templates(lm, ROME_TEMPLATES)
    if hparams.mom2_adjustment:
        inverse_statistics(lm, hparams)


def inverse_statistics(lm: LM, hp: ROMEHyperParams) -> torch.Tensor:
    """C⁻¹ `[d_ff, d_ff]` float64 of the edit layer, inverted once per loaded model and settings."""
    return inverse_mom2(lm, hp.layer, hp.stats_source, hp.stats_tokens)


def rank_one_update(
    weight_out_in: torch.Tensor,
    current: torch.Tensor,
    target: torch.Tensor,
    key: torch.Tensor,
    c_inv_key: torch.Tensor,
) -> torch.Tensor:
    """ΔW `[out, in]` with ΔW k = target − current and ΔW ∝ (C⁻¹k)ᵀ (float64 inside)."""
    u = c_inv_key.double()
    return (torch.outer(target.double() - current.double(), u) / (u @ key.double())).to(weight_out_in.dtype)


def rome_parameters(lm: LM, hp: ROMEHyperParams) -> list[str]:
    """The one weight ROME changes: the values module of its layer."""
    return [f"{lm.values_path(hp.layer)}.weight"]


def rome_target_plan(lm: LM, hp: ROMEHyperParams) -> TargetPlan:
    """v* at the FFN output of ROME's layer, over ROME's context templates."""
    site = ("ffn_out", lm.check_layer(hp.layer))
    return TargetPlan((site,), context_templates(lm, ROME_TEMPLATES), hp.target_options(), in_turn=True)


def rome_edit(lm: LM, requests: Sequence[EditRequest], hp: ROMEHyperParams) -> EditOutcome:
    """Apply ROME for each request in turn (ROME edits one fact at a time), in place."""
    layer = lm.check_layer(hp.layer)
    module = lm.module(lm.values_path(layer))
    plan = rome_target_plan(lm, hp)
    templates, (site,) = plan.templates, plan.sites
    flat = [[c for group in templates for c in group]]  # ROME averages k* over all templates at once
    c_inv = inverse_statistics(lm, hp) if hp.mom2_adjustment else None
    total_steps = 0
    records: list[ROMERecord] = []
    for k, request in enumerate(requests):
        key = subject_keys(lm, layer, [request], flat)[0]
        vectors, steps = plan.optimize(lm, [request], reuse=k == 0)  # later ones: weights the earlier changed
        init, delta = vectors[0][site]
        total_steps += steps[0]
        w = tensor_attr(module, "weight")
        dev = float64_device(w.device)  # the rank-one algebra runs beside the weight it changes
        key = key.to(dev)
        with torch.no_grad():
            current = module(key[None].to(w.device, w.dtype))[0].float().to(dev)
            u = key.double() if c_inv is None else c_inv.to(dev) @ key.double()
            upd = rank_one_update(w.T if lm.arch.transposed else w, current, (init + delta).to(dev), key, u)
            w += (upd.T if lm.arch.transposed else upd).to(w.device)
        records.append(ROMERecord(key, (init + delta).detach()))
    return EditOutcome(steps=total_steps, records=records)
