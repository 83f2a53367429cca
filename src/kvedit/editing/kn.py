"""KN: editing by knowledge neurons, as EasyEdit's KN editor does it (`easyeditor/models/kn`; REFERENCE-2 §3.4).

For each request: the knowledge neurons of its *true* object on the rewrite prompt alone (integrated gradients
over memory coefficients, `analysis.neurons`; one prompt, so every coarse neuron is kept: EasyEdit's
`refine: false`), then each neuron's value vector v (its row of the values module: the column of `down_proj`,
the row of GPT-2's Conv1D `c_proj`) moves from the model's own answer towards the new object in the input
embedding space:

- one-token new object: v ← v − 2·e(greedy) + 2·e(new);
- longer ones: v ← v − Σₖ e(greedyₖ) + Σₖ e(newₖ), over as many greedy tokens as the new object has.

`greedy` is the model's own continuation of the rewrite prompt (not the true object), as in EasyEdit. A request
without a true object (zsRE as MEMIT loads it: the new object is the data set's answer) takes the neurons of the
model's own next token, the answer the edit replaces. The only
weights written are the value rows of the neurons found; requests of one call are edited one after another.
Inside `reused_attributions(lm)` a call's first request takes attributions computed before in the block for the
same prompt, answer, steps and layers (a sweep over thresholds and edit factors integrates once per case).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..analysis.neurons import attributions, coarse_neurons
from ..data.requests import EditRequest
from ..models.lm import LM, tensor_attr
from .hparams import EditOutcome, check_ranges
from .presets import frozen_presets

#: EasyEdit's KN settings (hparams/KN/*.yaml): integration steps (= batch size there) and the coarse threshold.
#: Its llama rows integrate with one step (the gradient at zero × the activation); kvedit keeps 20 for every
#: family it has no row for, as the paper does. A model's own row (MODEL_PRESETS) is the setting
#: benchmarks/select_presets.py chose on its tuning split (docs/presets.md): SmolLM2 1 step, threshold 0.1, factor 8
#: (E / P / S 60 / 62 / 40, Score 51.9; 20 steps at the same threshold and factor 51.6); Gemma-3 20 steps, threshold
#: 0.1, factor 8 (54 / 60 / 44, Score 51.8; one step 47.5).
KN_PRESETS: Mapping[str, Mapping[str, Any]] = frozen_presets(
    {
        "gpt2-xl": {"max_steps": 20, "threshold": 0.2, "edit_factor": 2.0},
        "gpt-j": {"max_steps": 20, "threshold": 0.1, "edit_factor": 2.0},
        "llama": {"max_steps": 1, "threshold": 0.2, "edit_factor": 2.0},
        "gpt-neox": {"max_steps": 20, "threshold": 0.2, "edit_factor": 2.0},
        "smollm2": {"layers": tuple(range(30)), "max_steps": 1, "threshold": 0.1, "edit_factor": 8.0},
        "gemma3-270m": {"layers": tuple(range(18)), "max_steps": 20, "threshold": 0.1, "edit_factor": 8.0},
    }
)


@dataclass(frozen=True)
class KNHyperParams:
    """max_steps: integration steps; threshold: coarse neurons have attribution ≥ threshold × the largest;
    edit_factor: the embedding coefficient for a one-token new object (EasyEdit: 2); max_neurons: at most this
    many neurons (strongest first) per request, None for all; layers: only neurons in these layers (None: all)."""

    max_steps: int = 20
    threshold: float = 0.2
    edit_factor: float = 2.0
    max_neurons: int | None = None
    layers: tuple[int, ...] | None = None
    preset: str = "gpt2-xl"

    def validate(self, lm: LM | None) -> "KNHyperParams":
        check_ranges(self)
        for name in ("max_steps", "max_neurons"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not self.edit_factor > 0:
            raise ValueError(f"edit_factor must be > 0, got {self.edit_factor}")
        if lm is not None:
            if lm.arch.objective != "causal":
                raise ValueError(f"KN edits causal language models; {lm.arch.family} is a masked LM")
            for layer in self.layers or ():
                lm.check_layer(layer)
        return self

    def edit_layers(self, lm: LM) -> list[int]:
        return sorted({lm.check_layer(l) for l in self.layers}) if self.layers else list(range(lm.num_layers))


def kn_parameters(lm: LM, hp: KNHyperParams) -> list[str]:
    """The weights KN may write: the values module of every layer it searches."""
    return [f"{lm.values_path(layer)}.weight" for layer in hp.edit_layers(lm)]


@dataclass
class KNRecords:
    """Per request, the neurons edited: (layer, memory, attribution), strongest first."""

    neurons: list[list[tuple[int, int, float]]]


def _greedy(lm: LM, prompt: str, n: int) -> list[int]:
    """The model's own next `n` tokens after `prompt` (greedy)."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(lm.model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=lm.device)], dim=1)
    return out


def _value_rows(lm: LM, layer: int) -> torch.Tensor:
    """A view `[d_ff, d_model]` of layer `layer`'s value vectors, writable in place."""
    weight = lm.model.get_parameter(f"{lm.values_path(layer)}.weight")
    return weight.data if lm.arch.transposed else weight.data.T


_MEMO_KEY = "reused_attributions"  # lm.memo key of the open attribution memo

#: (rewrite prompt, true object, steps, layers) → attributions `[layers, d_ff]`
AttributionMemo = dict[tuple[str, str | int, int, tuple[int, ...]], torch.Tensor]


@contextmanager
def reused_attributions(lm: LM) -> Iterator[AttributionMemo]:
    """Within this block, a KN edit's first request takes the attributions computed before in the block for the
    same prompt, true object, integration steps and layers, instead of integrating again. Attributions depend on
    the weights, so this is for callers that start every edit from the weights the block opened on (edit, score,
    revert), e.g. a sweep over thresholds and edit factors."""
    if _MEMO_KEY in lm.memo:
        raise RuntimeError("reused_attributions is already active on this model")
    memo: AttributionMemo = {}
    lm.memo[_MEMO_KEY] = memo
    try:
        yield memo
    finally:
        del lm.memo[_MEMO_KEY]


def _attributions(lm: LM, request: EditRequest, hp: KNHyperParams, layers: list[int], first: bool) -> torch.Tensor:
    """The request's attributions on the rewrite prompt; from/into the open memo for a call's first request (later
    ones see weights the earlier requests changed)."""
    answer: str | int = (
        request.target_true if request.target_true is not None else _greedy(lm, request.rewrite_prompt, 1)[0]
    )
    memo: AttributionMemo | None = lm.memo.get(_MEMO_KEY) if first else None
    key = (request.rewrite_prompt, answer, hp.max_steps, tuple(layers))
    if memo is not None and key in memo:
        return memo[key]
    scores = attributions(lm, request.rewrite_prompt, answer, hp.max_steps, layers)
    if memo is not None:
        memo[key] = scores
    return scores


def kn_edit(lm: LM, requests: Sequence[EditRequest], hp: KNHyperParams) -> EditOutcome:
    """Edit each request in turn (module docstring); returns the neurons edited in `records`."""
    layers = hp.edit_layers(lm)
    embed = tensor_attr(lm.model.get_input_embeddings(), "weight").detach()
    edited: list[list[tuple[int, int, float]]] = []
    for k, request in enumerate(requests):
        scores = _attributions(lm, request, hp, layers, first=k == 0)
        neurons = sorted(
            ((l, i, float(scores[layers.index(l), i])) for l, i in coarse_neurons(scores, layers, hp.threshold)),
            key=lambda n: -n[2],
        )[: hp.max_neurons]
        new = lm.tokenizer(" " + request.target_new.strip(), add_special_tokens=False)["input_ids"]
        old = _greedy(lm, request.rewrite_prompt, len(new))
        factor = hp.edit_factor if len(new) == 1 else 1.0
        shift = factor * (embed[new].sum(0) - embed[old].sum(0))
        with torch.no_grad():
            for layer, memory, _ in neurons:
                rows = _value_rows(lm, layer)
                rows[memory] += shift.to(rows.dtype)
        edited.append(neurons)
    return EditOutcome(
        steps=len(requests) * hp.max_steps, records=KNRecords(edited), result={"neurons": [len(n) for n in edited]}
    )
