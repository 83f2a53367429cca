"""MEMIT (Meng et al. 2023): many facts at once, the update spread over a range of layers.

z_i = h_i + δ_i is optimised on the residual stream after the last edit layer L. Then, for each
layer l (in order), with keys K (values-module inputs at the subject's last token) recomputed on
the partly edited model and R the part of Z − H(L) still missing:

    ΔW_l = R_l Kᵀ (λ C + K Kᵀ)⁻¹,   R_l = R / (layers left)          (float64)

(computed from C⁻¹ by the push-through identity, see `update_keys`).

`distribute` is shared with PMET, which measures the FFN output instead and spreads with √.

Families with a norm after the FFN (Gemma-2/3, OLMo-2) write `norm(W k)` into the residual, not
`W k`. There the residual to spread is measured in what reaches the residual stream, and each
layer's share is turned into a values-module target through that layer's norm
(`output_for_written`: the output whose write is nearest to the goal, at the current output's scale)
before the linear solve; R below is then that target minus the current output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..data.requests import EditRequest
from ..models.devices import float64_device
from ..models.lm import LM, tensor_attr
from ..models.memory import output_for_written, written_output
from ..models.tracing import Site
from .context import MEMIT_TEMPLATES, context_templates
from .hparams import ClosedFormHyperParams, EditOutcome
from .presets import frozen_presets
from .stats import inverse_mom2, key_statistics
from .targets import TargetPlan, site_values, subject_keys

Spread = Literal["even", "sqrt"]


def spread_fraction(index: int, n_layers: int, spread: Spread) -> float:
    """Share of the remaining residual that layer `index` (0-based) of `n_layers` takes on."""
    left = n_layers - index
    return 1.0 / left if spread == "even" else 1.0 / math.sqrt(left)


@dataclass(frozen=True)
class MEMITHyperParams(ClosedFormHyperParams):
    """MEMIT settings; `mom2_update_weight` is λ. Empty `layers` = the family preset's."""

    layers: tuple[int, ...] = ()
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 20000.0

    def edit_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def validate(self, lm: LM | None) -> "MEMITHyperParams":
        super().validate(lm)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        return self


#: REFERENCE.md §4. "smollm2": window, λ and δ decay chosen by benchmarks/select_presets.py (docs/presets.md;
#: 48 settings on 50 tuning cases, the grid PMET shares): 3–7, λ 500, δ decay 0.5 score 100 / 96 / 74.
#: "gemma3-270m" likewise (25 settings): 1–5, λ 1500 (tied down to λ 50: the largest), δ decay 0.5 (tied with
#: 1e-3) score 98 / 96 / 82.
MEMIT_PRESETS: Mapping[str, Mapping[str, Any]] = frozen_presets(
    {
        "gpt2-xl": dict(
            layers=(13, 14, 15, 16, 17), max_steps=20, lr=0.5, weight_decay=0.5, mom2_update_weight=20000.0
        ),
        "gpt-j": dict(layers=(3, 4, 5, 6, 7, 8), max_steps=25, lr=0.5, weight_decay=0.5, mom2_update_weight=15000.0),
        "gpt-neox": dict(layers=(3, 4, 5, 6, 7, 8), max_steps=20, lr=0.5, weight_decay=0.5, mom2_update_weight=15000.0),
        "llama": dict(layers=(4, 5, 6, 7, 8), max_steps=25, lr=0.1, weight_decay=1e-3, mom2_update_weight=15000.0),
        "smollm2": dict(
            layers=(3, 4, 5, 6, 7),
            max_steps=25,
            lr=0.5,
            weight_decay=0.5,
            mom2_update_weight=500.0,
            stats_tokens=20_000,
        ),
        "gemma3-270m": dict(
            layers=(1, 2, 3, 4, 5),
            max_steps=25,
            lr=0.5,
            weight_decay=0.5,
            mom2_update_weight=1500.0,
            stats_tokens=20_000,
        ),
    }
)


@dataclass
class LayerRecord:
    """What one layer of the spread was asked to absorb: `remaining` and `assigned` `[N, d_out]`,
    the keys `[N, d_in]` it used and the update `[d_out, d_in]` it made. Behind a post-norm,
    `remaining` is measured in what reaches the residual and `assigned` is the module-output change
    that writes this layer's share of it."""

    layer: int
    remaining: torch.Tensor
    assigned: torch.Tensor
    keys: torch.Tensor
    update: torch.Tensor


@dataclass
class Target:
    """One module family to rewrite: keys are read at `key_site`, progress measured at `measure_site`.

    sublayer: whose output the module is ("ffn": values; "attn": attention output projection), which
    says which post-norm, if any, stands between the module and the residual.
    """

    module_path: Callable[[int], str]  # layer -> module name
    key_site: str  # Trace kind whose value is the module's input
    stats_kind: str  # key_statistics kind
    measure_site: Site
    goal: torch.Tensor  # [N, d_out] wanted value at measure_site
    records: list[LayerRecord] = field(default_factory=list)
    sublayer: Literal["ffn", "attn"] = "ffn"

    @property
    def output_site(self) -> str:
        """Trace kind of the module's own output."""
        return "ffn_out" if self.sublayer == "ffn" else "attn_out"


def has_post_norm(lm: LM, target: Target) -> bool:
    return (lm.arch.post_ffn_norm if target.sublayer == "ffn" else lm.arch.post_attn_norm) is not None


def written_remaining(lm: LM, target: Target, measured: torch.Tensor) -> torch.Tensor:
    """Goal − measured, in what reaches the residual (goals at the module's own output are passed
    through the post-norm of the layer they were measured at)."""
    if target.measure_site[0] != target.output_site:
        return target.goal.double() - measured
    layer = target.measure_site[1]
    return written_output(lm, layer, target.goal.double(), target.sublayer) - written_output(
        lm, layer, measured, target.sublayer
    )


def output_change(
    lm: LM, layer: int, target: Target, requests: Sequence[EditRequest], written_change: torch.Tensor
) -> torch.Tensor:
    """`[N, d_out]`: the change of `layer`'s module output that changes its write by `written_change`."""
    current = site_values(lm, (target.output_site, layer), requests).double()
    wanted = written_output(lm, layer, current, target.sublayer) + written_change
    return output_for_written(lm, layer, wanted, current, target.sublayer) - current


def update_keys(c_inv: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """`(λC + KᵀK)⁻¹ Kᵀ` `[d_in, N]` for keys K `[N, d_in]`, from C⁻¹ (float64).

    By the push-through identity this is `A (I + K A)⁻¹` with `A = C⁻¹Kᵀ / λ`: an `N × N` solve per edit
    instead of a `d_in × d_in` one, with C⁻¹ computed once per layer (`inverse_mom2`)."""
    a = c_inv @ keys.T / lam  # [d_in, N]
    small = torch.eye(keys.shape[0], dtype=a.dtype, device=a.device) + keys @ a  # [N, N], symmetric
    return torch.linalg.solve(small, a.T).T


def distribute(
    lm: LM,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    targets: Sequence[Target],
    hp: MEMITHyperParams,
    spread: Spread,
    templates: list[list[str]],
) -> None:
    """Write each target's missing residual into the layers' weights, in place (see module doc); `hp` gives
    the key statistics (stats_source, stats_tokens) and λ (mom2_update_weight): MEMIT's settings or PMET's."""
    for target in targets:  # statistics of every layer in one pass, before the first is needed
        key_statistics(lm, layers, hp.stats_source, hp.stats_tokens, kind=target.stats_kind)
    for i, layer in enumerate(layers):
        for target in targets:
            weight = tensor_attr(lm.module(target.module_path(layer)), "weight")
            dev = float64_device(weight.device)  # the algebra runs beside the weight it changes
            keys = subject_keys(lm, layer, requests, templates, site=target.key_site).to(dev).double()  # [N, d_in]
            measured = site_values(lm, target.measure_site, requests).to(dev).double()
            target.goal = target.goal.to(dev)
            if has_post_norm(lm, target):
                remaining = written_remaining(lm, target, measured)
                assigned = output_change(
                    lm, layer, target, requests, remaining * spread_fraction(i, len(layers), spread)
                )
            else:
                remaining = target.goal.double() - measured
                assigned = remaining * spread_fraction(i, len(layers), spread)
            c_inv = inverse_mom2(lm, layer, hp.stats_source, hp.stats_tokens, kind=target.stats_kind).to(dev)
            update = assigned.T @ update_keys(c_inv, keys, hp.mom2_update_weight).T  # [d_out, d_in]
            with torch.no_grad():
                weight += (update.T if lm.arch.transposed else update).to(weight.device, weight.dtype)
            target.records.append(LayerRecord(layer, remaining.float(), assigned.float(), keys.float(), update.float()))


def summarize_records(targets: Sequence[Target]) -> list[dict[str, Any]]:
    """Per layer and target: norms of the remaining residual, of what it took on, and of ΔW."""
    return [
        {
            "layer": r.layer,
            "module": t.module_path(r.layer),
            "remaining_norm": float(r.remaining.norm(dim=1).mean()),
            "assigned_norm": float(r.assigned.norm(dim=1).mean()),
            "update_norm": float(r.update.norm()),
        }
        for t in targets
        for r in t.records
    ]


def memit_prepare(lm: LM, hparams: MEMITHyperParams) -> None:
    """Compute, or load from the cache, what every edit with these settings reuses: the context
    templates and the key statistics of the edited layers' values (inverted, kept in memory)."""
    context_templates(lm, MEMIT_TEMPLATES)
    key_statistics(lm, list(hparams.layers), hparams.stats_source, hparams.stats_tokens)
    for layer in hparams.layers:
        inverse_mom2(lm, layer, hparams.stats_source, hparams.stats_tokens)


def memit_parameters(lm: LM, hp: MEMITHyperParams) -> list[str]:
    """The values weights of every edit layer."""
    return [f"{lm.values_path(l)}.weight" for l in hp.layers]


def memit_target_plan(lm: LM, hparams: ClosedFormHyperParams) -> TargetPlan:
    """z at the residual stream after the last edit layer, over MEMIT's context templates (AlphaEdit's too)."""
    last = lm.check_layer(hparams.edit_layers()[-1])
    return TargetPlan((("residual", last),), context_templates(lm, MEMIT_TEMPLATES), hparams.target_options())


def memit_edit(lm: LM, requests: Sequence[EditRequest], hparams: MEMITHyperParams) -> EditOutcome:
    """Edit all `requests` at once into the values of `hparams.layers`, in place."""
    layers = [lm.check_layer(l) for l in hparams.layers]
    plan = memit_target_plan(lm, hparams)
    templates, (site,) = plan.templates, plan.sites
    vectors, steps = plan.optimize(lm, requests)
    goals = torch.stack([v[site][0] + v[site][1] for v in vectors])
    target = Target(lm.values_path, "coefficients", "values", site, goals)
    distribute(lm, requests, layers, [target], hparams, "even", templates)
    return EditOutcome(steps=sum(steps), records=target.records, result={"layers": summarize_records([target])})
