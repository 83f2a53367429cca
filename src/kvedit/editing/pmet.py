"""PMET (Li et al. 2024): optimise attention and FFN outputs together, update only the FFN.

δ_a (added to the attention output) and δ_m (added to the FFN output) of the last edit layer L
are optimised jointly at the subject's last token, with PMET's loss schedule (NLL weight 0.1 once
target_new is the argmax; stop when the KL term is ≤ 0.01). Only the FFN values are updated,
towards the FFN target v^m = m + δ_m, the residual spread with a square root (eq. 11):

    R^l = (V^m − W₀ K) / √(L − l + 1)

Ablations: `attn_delta=False` (optimise δ_m alone), `update_attn=True` (also rewrite the
attention output projections towards a + δ_a), `spread="even"` (MEMIT's spread).

With a post-FFN (post-attention) norm, δ_m (δ_a) is still added to the module's own output, before
the norm, as ROME's v*; the spread goes through the norm as in MEMIT (`memit.distribute`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.requests import EditRequest
from ..models.lm import LM
from .context import MEMIT_TEMPLATES, context_templates
from .hparams import EditOutcome
from .memit import LayerRecord, MEMITHyperParams, Spread, Target, distribute, memit_prepare, summarize_records
from .presets import frozen_presets
from .stats import inverse_mom2, key_statistics
from .targets import TargetOptions, TargetPlan


@dataclass(frozen=True)
class PMETHyperParams(MEMITHyperParams):
    """PMET settings: MEMIT's, with the paper's GPT-J defaults, plus the ablation switches."""

    max_steps: int = 30
    lr: float = 0.2
    kl_factor: float = 1.0
    mom2_update_weight: float = 6000.0
    attn_delta: bool = True
    update_attn: bool = False
    spread: Spread = "sqrt"
    preset: str = "gpt-j"

    def validate(self, lm: LM | None) -> "PMETHyperParams":
        super().validate(lm)
        if self.spread not in ("sqrt", "even"):
            raise ValueError(f"spread must be 'sqrt' or 'even', got {self.spread!r}")
        if self.update_attn and not self.attn_delta:
            raise ValueError("update_attn needs attn_delta: the attention target is a + δ_a")
        return self

    def target_options(self, **extra: Any) -> TargetOptions:
        return super().target_options(pmet_schedule=True, **extra)


#: REFERENCE.md §5. "smollm2": window, λ and δ decay chosen by benchmarks/select_presets.py on MEMIT's grid
#: (docs/presets.md; 48 settings on 50 tuning cases): 6–10, λ 50, δ decay 0.5 score 96 / 90 / 72 (84.7; 3–7 at
#: λ 500, 96 / 84 / 76, scores 84.6). "gemma3-270m" likewise (25 settings): 2–6, λ 1500, δ decay 1e-3 score
#: 96 / 80 / 84 (86.2; at decay 0.5, 88 / 76 / 84, 82.4).
PMET_PRESETS: Mapping[str, Mapping[str, Any]] = frozen_presets(
    {
        "gpt-j": dict(layers=(3, 4, 5, 6, 7, 8), max_steps=30, lr=0.2, kl_factor=1.0, mom2_update_weight=6000.0),
        "gpt-j-zsre": dict(layers=(3, 4, 5, 6, 7, 8), max_steps=20, lr=0.5, kl_factor=1.0, mom2_update_weight=4500.0),
        "gpt-neox": dict(layers=(3, 4, 5, 6, 7, 8), max_steps=30, lr=0.2, kl_factor=1.0, mom2_update_weight=6000.0),
        "gpt2-xl": dict(layers=(13, 14, 15, 16, 17), max_steps=30, lr=0.2, kl_factor=1.0, mom2_update_weight=6000.0),
        "llama": dict(layers=(4, 5, 6, 7, 8), max_steps=30, lr=0.2, kl_factor=1.0, mom2_update_weight=6000.0),
        "smollm2": dict(
            layers=(6, 7, 8, 9, 10),
            max_steps=30,
            lr=0.2,
            kl_factor=1.0,
            mom2_update_weight=50.0,
            weight_decay=0.5,
            stats_tokens=20_000,
        ),
        "gemma3-270m": dict(
            layers=(2, 3, 4, 5, 6),
            max_steps=30,
            lr=0.2,
            kl_factor=1.0,
            mom2_update_weight=1500.0,
            weight_decay=1e-3,
            stats_tokens=20_000,
        ),
    }
)


def pmet_prepare(lm: LM, hparams: PMETHyperParams) -> None:
    """MEMIT's preparation, plus the attention outputs' key statistics when they are updated too."""
    memit_prepare(lm, hparams)
    if hparams.update_attn:
        key_statistics(lm, list(hparams.layers), hparams.stats_source, hparams.stats_tokens, kind="attn_out")
        for layer in hparams.layers:
            inverse_mom2(lm, layer, hparams.stats_source, hparams.stats_tokens, kind="attn_out")


@dataclass(frozen=True)
class PMETRecords:
    """Per edit layer, what the FFN values (and, with `update_attn`, the attention outputs) took on."""

    ffn: list[LayerRecord]
    attn: list[LayerRecord]


def pmet_parameters(lm: LM, hp: PMETHyperParams) -> list[str]:
    """The values weights of every edit layer, and their attention output projections with `update_attn`."""
    names = [f"{lm.values_path(l)}.weight" for l in hp.layers]
    return names + ([f"{lm.attn_out_path(l)}.weight" for l in hp.layers] if hp.update_attn else [])


def pmet_target_plan(lm: LM, hparams: PMETHyperParams) -> TargetPlan:
    """δ_a and δ_m at the attention and FFN outputs of the last edit layer (δ_m alone without `attn_delta`)."""
    last = lm.check_layer(hparams.layers[-1])
    ffn_site, attn_site = ("ffn_out", last), ("attn_out", last)
    sites = (attn_site, ffn_site) if hparams.attn_delta else (ffn_site,)
    return TargetPlan(sites, context_templates(lm, MEMIT_TEMPLATES), hparams.target_options())


def pmet_edit(lm: LM, requests: Sequence[EditRequest], hparams: PMETHyperParams) -> EditOutcome:
    """Edit all `requests` at once with PMET, in place (FFN values, plus attention output projections
    with `update_attn`)."""
    layers = [lm.check_layer(l) for l in hparams.layers]
    plan = pmet_target_plan(lm, hparams)
    templates, sites = plan.templates, plan.sites
    ffn_site, attn_site = ("ffn_out", layers[-1]), ("attn_out", layers[-1])
    vectors, steps = plan.optimize(lm, requests)
    goals = {s: torch.stack([v[s][0] + v[s][1] for v in vectors]) for s in sites}
    ffn = Target(lm.values_path, "coefficients", "values", ffn_site, goals[ffn_site])
    targets = [ffn]
    if hparams.update_attn:
        targets.append(Target(lm.attn_out_path, "attn_heads", "attn_out", attn_site, goals[attn_site], sublayer="attn"))
    distribute(lm, requests, layers, targets, hparams, hparams.spread, templates)
    records = PMETRecords(ffn.records, targets[1].records if hparams.update_attn else [])
    return EditOutcome(steps=sum(steps), records=records, result={"layers": summarize_records(targets)})
