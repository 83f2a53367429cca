"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's targets, the update confined to the null space of preserved keys.

Per batch of N requests, with L edit layers and z* the target of the residual stream after the last one
(MEMIT's, `optimize_targets`), each layer l_i in ascending order, on the model the earlier layers left:

    K   [d_k, N]     the requests' keys (values-module input at the subject's last token, template-averaged)
    R   [d_out, N]   (z* − z_current) / (L − i): the residual still missing, spread evenly (as MEMIT)
    P   [d_k, d_k]   projector onto the null space of the unedited model's keys (`alphaedit_state`)
    C   [d_k, d_k]   Σ K_p K_pᵀ over the keys of earlier batches of a sequential run (0 without one)

    X  = (P (K Kᵀ + C) + λ I)⁻¹ P K Rᵀ        [d_k, d_out];    ΔW_l = Xᵀ   [d_out, d_k]

λ is `l2` (the reference's `L2`). The system matrix is not symmetric: a general solver (LU) is used. Rows of
ΔW lie in the range of P (ΔW P = ΔW), so ΔW k ≈ 0 for the preserved keys. After all layers of the batch,
the keys are measured again on the edited model and K Kᵀ is added to the history of each layer; a caller
that carries no history (a one-shot edit) skips that step.

Algebraically, with no history ΔW = R K̃ᵀ (K̃ K̃ᵀ + λ I)⁻¹ with K̃ = P K: MEMIT's closed form with λ I in place
of MEMIT's λ·E[kkᵀ], applied to the projected keys (docs/alphaedit.md). Families with a norm after the FFN
(Gemma-2/3, OLMo-2) turn each layer's share into a values-module target as MEMIT does (`memit.distribute`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.requests import EditRequest
from ..models.devices import float64_device
from ..models.lm import LM, tensor_attr
from .alphaedit_state import PRECISIONS, AlphaEditHistory, Precision, null_space_projector, torch_dtype
from .context import MEMIT_TEMPLATES, context_templates
from .delta import EditError
from .hparams import ClosedFormHyperParams, EditOutcome
from .memit import (
    MEMIT_PRESETS,
    LayerRecord,
    Target,
    has_post_norm,
    memit_target_plan,
    output_change,
    spread_fraction,
    summarize_records,
    written_remaining,
)
from .presets import frozen_presets
from .stats import key_statistics
from .targets import site_values, subject_keys


@dataclass(frozen=True)
class AlphaEditHyperParams(ClosedFormHyperParams):
    """AlphaEdit settings: MEMIT's target optimisation, plus

    l2: λ, the weight of ‖ΔW‖² (the reference's `L2`); nullspace_threshold: eigenvalues of E[kkᵀ] (per-token
    mean of the unedited model's values-module inputs) below it span the null space P projects onto;
    precision: dtype of the eigen-decomposition, P, the solve and the history ("float32" as the reference).
    Empty `layers` = the family preset's.
    """

    layers: tuple[int, ...] = ()
    clamp_norm_factor: float = 0.75
    l2: float = 10.0
    nullspace_threshold: float = 2e-2
    precision: Precision = "float32"

    def edit_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def validate(self, lm: LM | None) -> "AlphaEditHyperParams":
        super().validate(lm)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        for name in ("l2", "nullspace_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        return self


#: REFERENCE-2.md §1.5, from jianghoucheng/AlphaEdit hparams/AlphaEdit/{gpt2-xl,EleutherAI_gpt-j-6B,Llama3-8B}.json
#: (L2 = 10 and nullspace_threshold = 2e-2 in all three; clamp_norm_factor 0.75 and kl_factor 0.0625, the class
#: defaults, too). Rows the reference has no file for take kvedit's MEMIT row of the same name (the reference's
#: AlphaEdit files equal its MEMIT files but for the two null-space fields) with the reference's L2 and threshold:
#: "gpt-neox" (no reference model), "smollm2" and "gemma3-270m" (chosen for MEMIT by benchmarks/select_presets.py,
#: not tuned for AlphaEdit).
_REFERENCE_ROWS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict(layers=(13, 14, 15, 16, 17), max_steps=20, lr=0.5, weight_decay=0.5),
    "gpt-j": dict(layers=(3, 4, 5, 6, 7, 8), max_steps=25, lr=0.5, weight_decay=0.5),
    "llama": dict(layers=(4, 5, 6, 7, 8), max_steps=25, lr=0.1, weight_decay=0.5),
}
_FROM_MEMIT = ("gpt-neox", "smollm2", "gemma3-270m")
ALPHAEDIT_PRESETS: Mapping[str, Mapping[str, Any]] = frozen_presets(
    {
        **{name: row | dict(l2=10.0, nullspace_threshold=2e-2) for name, row in _REFERENCE_ROWS.items()},
        **{
            name: {k: v for k, v in MEMIT_PRESETS[name].items() if k != "mom2_update_weight"}
            | dict(l2=10.0, nullspace_threshold=2e-2)
            for name in _FROM_MEMIT
        },
    }
)


@dataclass
class AlphaEditRecords:
    """What an AlphaEdit batch did (kept in memory on the delta, never saved).

    layers: per layer, the residual it was asked to absorb, the keys and ΔW (`memit.LayerRecord`);
    null_dims: rank of P per layer; history: the history after this batch — the one to pass to the next batch
    of a sequential run — or None when the edit was given none.
    """

    layers: list[LayerRecord]
    null_dims: dict[int, int]
    history: AlphaEditHistory | None


def alphaedit_update(
    keys: torch.Tensor, assigned: torch.Tensor, projector: torch.Tensor, history_sum: torch.Tensor, l2: float
) -> torch.Tensor:
    """ΔW `[d_out, d_k]` = Xᵀ with X = (P (KᵀK + C) + λI)⁻¹ P Kᵀ A, in the dtype of `keys`.

    keys `[N, d_k]` (a row per request); assigned `[N, d_out]` (each request's share of the residual for this
    layer); projector P and history_sum C `[d_k, d_k]`; l2 λ.
    """
    d_k = keys.shape[1]
    if projector.shape != (d_k, d_k) or history_sum.shape != (d_k, d_k):
        raise ValueError(f"P {tuple(projector.shape)} and C {tuple(history_sum.shape)} must be {d_k}×{d_k}")
    eye = torch.eye(d_k, dtype=keys.dtype, device=keys.device)
    system = projector @ (keys.T @ keys + history_sum) + l2 * eye  # not symmetric: LU, not Cholesky
    rhs = projector @ (keys.T @ assigned)  # [d_k, d_out]
    return torch.linalg.solve(system, rhs).T


def alphaedit_prepare(lm: LM, hparams: AlphaEditHyperParams) -> None:
    """Compute, or load from the cache, what every edit with these settings reuses: the context templates,
    the key statistics of the edit layers and their projectors. Call it on the unedited model."""
    context_templates(lm, MEMIT_TEMPLATES)
    key_statistics(lm, list(hparams.layers), hparams.stats_source, hparams.stats_tokens)
    for layer in hparams.layers:
        null_space_projector(
            lm, layer, hparams.stats_source, hparams.stats_tokens, hparams.nullspace_threshold, hparams.precision
        )


def alphaedit_parameters(lm: LM, hp: AlphaEditHyperParams) -> list[str]:
    """The values weights of every edit layer."""
    return [f"{lm.values_path(l)}.weight" for l in hp.layers]


def alphaedit_edit(
    lm: LM, requests: Sequence[EditRequest], hparams: AlphaEditHyperParams, history: AlphaEditHistory | None = None
) -> EditOutcome:
    """Edit all `requests` at once into the values of `hparams.layers`, in place (see the module doc).

    history: Σ K Kᵀ of the earlier batches of a sequential run (None or an empty history: the first batch).
    It is not changed; the history after this batch is `outcome.records.history` (None when none was given,
    so a one-shot edit spends no time measuring keys for a next batch that will not come).
    """
    layers = [lm.check_layer(l) for l in hparams.layers]
    if history is not None:
        history.check_model(lm)
    dtype = torch_dtype(hparams.precision)
    projectors = {
        l: null_space_projector(
            lm, l, hparams.stats_source, hparams.stats_tokens, hparams.nullspace_threshold, hparams.precision
        )
        for l in layers
    }
    null_dims = {l: p.null_dim for l, p in projectors.items()}
    empty = [l for l, n in null_dims.items() if n == 0]
    if empty:
        warnings.warn(
            f"AlphaEdit: no eigenvalue of E[kkᵀ] is below {hparams.nullspace_threshold:g} at layer(s) "
            f"{empty}, so P = 0 there and those layers cannot change; raise nullspace_threshold",
            stacklevel=2,
        )
    plan = memit_target_plan(lm, hparams)
    templates, (site,) = plan.templates, plan.sites
    vectors, steps = plan.optimize(lm, requests)
    goals = torch.stack([v[site][0] + v[site][1] for v in vectors])
    target = Target(lm.values_path, "coefficients", "values", site, goals)
    for i, layer in enumerate(layers):
        weight = tensor_attr(lm.module(lm.values_path(layer)), "weight")
        dev = float64_device(weight.device) if dtype == torch.float64 else weight.device
        keys = subject_keys(lm, layer, requests, templates).to(dev, dtype)  # [N, d_k]
        measured = site_values(lm, site, requests).to(dev).double()
        target.goal = target.goal.to(dev)
        share = spread_fraction(i, len(layers), "even")
        if has_post_norm(lm, target):
            remaining = written_remaining(lm, target, measured)
            assigned = output_change(lm, layer, target, requests, remaining * share)
        else:
            remaining = target.goal.double() - measured
            assigned = remaining * share
        history_sum = (history or AlphaEditHistory()).sum_for(layer, keys.shape[1], dtype, dev)
        update = alphaedit_update(keys, assigned.to(dtype), projectors[layer].matrix.to(dev), history_sum, hparams.l2)
        if not torch.isfinite(update).all():
            raise EditError(f"AlphaEdit's update of layer {layer} is not finite; weights restored")
        with torch.no_grad():
            weight += (update.T if lm.arch.transposed else update).to(weight.device, weight.dtype)
        target.records.append(LayerRecord(layer, remaining.float(), assigned.float(), keys.float(), update.float()))
    after = None
    if history is not None:  # the reference adds the keys measured on the fully edited model
        keys_after = {l: subject_keys(lm, l, requests, templates).to(dtype) for l in layers}
        after = history.added(keys_after, len(requests), lm.base_fingerprint)
    result = {
        "layers": summarize_records([target]),
        "null_space_dims": {str(l): n for l, n in null_dims.items()},
        "history_edits_before": None if history is None else history.n_edits,
    }
    return EditOutcome(steps=sum(steps), records=AlphaEditRecords(target.records, null_dims, after), result=result)
