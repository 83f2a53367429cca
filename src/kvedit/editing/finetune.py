"""Edit facts by fine-tuning only the FFN keys or only the FFN values (Qiu et al. 2024).

Everything but the chosen matrices is frozen. The loss is the mean per-token NLL of `target_new`
after the rewrite prompt, averaged over the requests of the batch, with one of two objectives:

- "teacher_forced": token j of the target is predicted after the prompt and target tokens < j.
- "prompt_last": every target token is predicted at the prompt's last position (ROME's FT-L and
  EasyEdit's "prompt_last" objective; for one-token targets the two are the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from ..data.requests import EditRequest
from ..evaluation.scoring import EncodedTarget, TargetBatch, encode_target, score_batch
from ..models.compute import compute_view, trained_through
from ..models.lm import LM
from .delta import check_finite
from .hparams import EditOutcome, check_ranges
from .presets import FT_FAMILY_DEPTH, frozen_presets, given_overrides, make_hparams

Target = Literal["keys", "key:gate", "key:up", "key", "values"]
Objective = Literal["teacher_forced", "prompt_last"]

#: Named optimiser settings. "qiu2024" is the paper's stated setting (coupled L2 decay, which
#: slows the edit down); "ft-l" is ROME's constrained fine-tuning baseline (`baselines/ft`,
#: `FT/*_constr.json`: Adam lr 5e-4, 25 steps, prompt-last loss, stop below 1e-2, weights clamped
#: within ±5e-4 of the original; `norm_constraint=0` gives EasyEdit's unconstrained FT-L);
#: "default" was chosen by the sweep in benchmarks/ft_layer_sweep.py on the bundled model.
FT_PRESETS: Mapping[str, Mapping[str, Any]] = frozen_presets(
    {
        "default": dict(
            optimizer="adamw",
            lr=2e-3,
            weight_decay=0.0,
            max_steps=25,
            early_stop_nll=0.1,
            norm_constraint=0.0,
            objective="teacher_forced",
        ),
        "qiu2024": dict(
            optimizer="adam",
            lr=5e-4,
            weight_decay=0.5,
            max_steps=100,
            early_stop_nll=0.1,
            norm_constraint=0.0,
            objective="teacher_forced",
        ),
        "ft-l": dict(
            optimizer="adam",
            lr=5e-4,
            weight_decay=0.0,
            max_steps=25,
            early_stop_nll=1e-2,
            norm_constraint=5e-4,
            objective="prompt_last",
        ),
    }
)


def default_layers(lm: LM) -> tuple[int, ...]:
    """The family's default edit layer for fine-tuning (its FT_FAMILY_DEPTH row)."""
    fraction = FT_FAMILY_DEPTH.get(lm.model.config.model_type, 0.1)
    return (round(fraction * (lm.num_layers - 1)),)


@dataclass(frozen=True)
class FTHyperParams:
    """Fine-tuning edit settings.

    target: "keys" (all key modules: gate+up when gated), "key:gate", "key:up", or "values".
    layers: layers whose target matrices are trained; empty = the family default.
    optimizer: "adam" (torch Adam, L2 decay added to the gradient) or "adamw" (decoupled decay).
    early_stop_nll: stop once every request's mean NLL of target_new is below this (nats/token).
    norm_constraint: clamp each weight within ±this of its original value after every step (FT-L);
        0 = no constraint. (As an override, None means "the preset's value": pass 0 to switch a
        preset's constraint off.)
    objective: "teacher_forced" or "prompt_last" (see the module docstring).
    """

    target: Target = "keys"
    layers: tuple[int, ...] = ()
    preset: str = "default"
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_steps: int = 25
    early_stop_nll: float | None = 0.1
    norm_constraint: float | None = 0.0
    objective: Objective = "teacher_forced"

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> "FTHyperParams":
        """The named preset with `overrides` (None: the preset's value); no model's own row."""
        return make_hparams(cls, FT_PRESETS, preset, None, **given_overrides(overrides))

    def validate(self, lm: LM | None) -> "FTHyperParams":
        """Check every setting (with a model: layers and modules too) and return the settings the edit uses,
        default layers filled in."""
        check_ranges(self)
        if self.target not in ("keys", "key:gate", "key:up", "key", "values"):
            raise ValueError(f"target {self.target!r} is not one of keys, key:gate, key:up, values")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer {self.optimizer!r} is not one of adam, adamw")
        if self.norm_constraint is not None and not self.norm_constraint >= 0:
            raise ValueError(f"norm_constraint must be >= 0 (0: no constraint), got {self.norm_constraint}")
        if self.objective not in ("teacher_forced", "prompt_last"):
            raise ValueError(f"objective {self.objective!r} is not one of teacher_forced, prompt_last")
        if lm is None:
            return self
        layers = self.layers or default_layers(lm)
        for layer in layers:
            lm.check_layer(layer)
        if self.target.startswith("key:"):
            lm.key_paths(layers[0], (self.target.split(":")[1],))
        if self.objective == "prompt_last" and lm.arch.objective != "causal":
            raise ValueError(f"objective 'prompt_last' needs a causal LM; {lm.arch.family} is a masked LM")
        return replace(self, layers=tuple(lm.check_layer(l) for l in layers))

    def module_paths(self, lm: LM) -> list[str]:
        paths: list[str] = []
        for layer in self.layers:
            if self.target == "values":
                paths.append(lm.values_path(layer))
            else:
                roles = None if self.target == "keys" else (self.target.split(":")[-1],)
                paths.extend(lm.key_paths(layer, roles).values())
        return paths


def encode_request(lm: LM, request: EditRequest, objective: Objective) -> EncodedTarget:
    """The ids and scored positions of `request`'s target_new after its rewrite prompt.

    "prompt_last" reads the prompt alone and scores every target token at its last position.
    """
    encoded = encode_target(lm, request.rewrite_prompt, request.target_new)
    if objective == "teacher_forced":
        return encoded
    n_prompt = len(encoded.input_ids) - len(encoded.target_ids)
    return EncodedTarget(encoded.input_ids[:n_prompt], (n_prompt - 1,) * len(encoded.target_ids), encoded.target_ids)


def finetune_parameters(lm: LM, hp: FTHyperParams) -> list[str]:
    """The weights fine-tuning trains: the chosen key or value matrices of the edit layers."""
    return [f"{path}.weight" for path in hp.module_paths(lm)]


def finetune_edit(lm: LM, requests: Sequence[EditRequest], hp: FTHyperParams) -> EditOutcome:
    """Edit `requests` into `lm` in place by training only the chosen keys or values
    (`result["loss"]`: the mean target NLL before each step)."""
    batch = TargetBatch.collate([encode_request(lm, r, hp.objective) for r in requests], lm.tokenizer.pad_token_id)
    losses: list[float] = []
    lm.model.requires_grad_(False)  # the registry's guard restores every flag afterwards
    params = [lm.model.get_parameter(name) for name in finetune_parameters(lm, hp)]
    for p in params:
        p.requires_grad_(True)
    originals = [p.detach().clone() for p in params] if hp.norm_constraint else []
    optim_cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    optimizer = optim_cls(params, lr=hp.lr, weight_decay=hp.weight_decay)
    steps = 0
    view = compute_view(lm)  # the model itself in float32; else a frozen copy whose trained weights are casts of params
    names = finetune_parameters(lm, hp)
    with trained_through(view, dict(zip(names, params))):
        for steps in range(hp.max_steps + 1):
            if _ft_step(view, batch, hp, params, originals, optimizer, losses, steps):
                break
    for p in params:
        p.grad = None
    return EditOutcome(steps=steps, result={"loss": losses})


def _ft_step(
    view: LM,
    batch: TargetBatch,
    hp: FTHyperParams,
    params: list[torch.nn.Parameter],
    originals: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    steps: int,
) -> bool:
    """One fine-tuning step on `view` (float32 `params` stepped); appends the mean NLL before it; True when done."""
    nll = score_batch(view, batch).nll
    losses.append(check_finite(float(nll.detach().mean()), "the fine-tuning loss"))
    converged = hp.early_stop_nll is not None and bool((nll < hp.early_stop_nll).all())
    if converged or steps == hp.max_steps:
        return True
    optimizer.zero_grad(set_to_none=True)
    nll.mean().backward()
    optimizer.step()
    if hp.norm_constraint:
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                p.copy_(torch.maximum(torch.minimum(p, p0 + hp.norm_constraint), p0 - hp.norm_constraint))
    return False
