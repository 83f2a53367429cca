"""T-Patcher (Huang et al. 2023, "one mistake worth one neuron"): an edit *adds* memories to the last FFN layer.

For each request the model gets wrong, one new memory per mistaken target token (at most `max_neurons`): a key
k (with bias b where the family's first FFN linear has one) that fires on the input q_e the FFN reads where the
token is predicted, and a value v written there. Its pre-activation is a(q) = k·q + b; it adds

    v · f(a(q))                     (FFN with a bias: GPT-2, GPT-J, GPT-NeoX, OPT)
    v · f(k·q) · (u·q)              (gated FFN without biases: Llama, Gemma, Qwen, OLMo, …: a gate row k and an
                                     up row u, since these families cannot hold a key bias; a(q) = k·q)

as the layer's own memories do, so after training it is merged as one more row of the key module(s) and one more
value vector (the patch records the growth; see `models.ffn_width` for how the model is saved). Only the new
memories train; the model is frozen. Losses (REFERENCE-2 §2.3, the reference's zsRE settings):

- edit loss: the target's label-smoothed (ε = 0.1) mean NLL after the rewrite prompt;
- activation loss: exp(−a(q_e)) per new memory at its own position (the reference's top-5 mean over 8 dropout
  copies of the example; the model here has no dropout at edit time, so there is one copy);
- memory loss (weight 10): mean of the top-1000 of exp(a(qᵢ) − a(q_e) + 3) and of exp(a(qᵢ) + 3) over memory
  inputs qᵢ — the FFN inputs of the layer over `stats_tokens` tokens of `stats_source` (and the inputs of earlier
  requests of the call, appended after each edit so later memories stay silent on them).

Init: k = q_e/‖q_e‖² (a(q_e) = 1), b = 0, u = k, v = e ⊙ a with e ~ N(0, I) seeded and a = 10. Adam lr 1e-2, weight
decay 0.01, gradient clip 5, at most `max_steps` steps; ReduceLROnPlateau (×0.5, patience 1, threshold 0.05)
on the edit loss every 25 steps; from step 100, every 25 steps, once the target is predicted the held-out memory
loss is checked and training stops when it has not improved by 0.001 (the reference's early stopping).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..data.requests import EditRequest
from ..evaluation.scoring import encode_target
from ..models.ffn_width import grow
from ..models.lm import LM
from ..models.split import layer_returns_tuple, replayed_layers
from ..models.tracing import Trace
from .hparams import EditOutcome, check_ranges
from .presets import frozen_presets
from .stats import statistics_batches

_REFERENCE = {
    "layers": (-1,),
    "lr": 1e-2,
    "weight_decay": 0.01,
    "max_steps": 2000,
    "memory_weight": 10.0,
    "max_neurons": 5,
    "stats_source": "self",
    "stats_tokens": 40_000,
}
#: "reference": the reference's zsRE settings (REFERENCE-2 §2). A model's own row (MODEL_PRESETS) is the setting
#: benchmarks/select_presets.py chose on its tuning split (docs/presets.md): SmolLM2 memory weight 5, 5 neurons,
#: lr 3e-3 (E / P / S 100 / 18 / 72, Score 37.8; the grid spans 34.6-37.8, one or two tuning cases); Gemma-3, on a
#: grid reduced to SmolLM2's memory weight and neurons, lr 3e-2 (100 / 32 / 62, Score 52.3; 1e-2 50.9, 3e-3 41.5).
TPATCHER_PRESETS = frozen_presets(
    {
        "reference": _REFERENCE,
        "smollm2": {**_REFERENCE, "layers": (29,), "lr": 3e-3, "memory_weight": 5.0, "max_neurons": 5},
        "gemma3-270m": {**_REFERENCE, "layers": (17,), "lr": 3e-2, "memory_weight": 5.0, "max_neurons": 5},
    }
)
HELD_OUT = 0.1  # share of the memory inputs kept for the stopping check (the reference's validation memory)
EDIT_SMOOTHING, ACT_MARGIN, GAMMA, BETA, TOP_MEMORY, VALUE_AMPLITUDE, CLIP = 0.1, 0.0, 3.0, -3.0, 1000, 10.0, 5.0


@dataclass(frozen=True)
class TPatcherHyperParams:
    """layers: the layer that gets the memories (one; -1 = the last, the reference's); lr, weight_decay, max_steps:
    the optimiser's; memory_weight: the memory loss's weight (mlc: 10 for zsRE, 5 for FEVER); max_neurons: new
    memories per request at most; stats_source / stats_tokens: the corpus and size of the memory inputs."""

    layers: tuple[int, ...] = (-1,)
    lr: float = 1e-2
    weight_decay: float = 0.01
    max_steps: int = 2000
    memory_weight: float = 10.0
    max_neurons: int = 5
    stats_source: str = "self"
    stats_tokens: int = 40_000
    seed: int = 0
    preset: str = "reference"

    def validate(self, lm: LM | None) -> "TPatcherHyperParams":
        check_ranges(self)
        if len(self.layers) != 1:
            raise ValueError(f"T-Patcher adds memories to one layer; got layers {list(self.layers)}")
        if self.max_neurons < 1 or self.memory_weight < 0:
            raise ValueError("max_neurons must be >= 1 and memory_weight >= 0")
        if lm is not None:
            if lm.arch.objective != "causal":
                raise ValueError(f"T-Patcher here edits causal language models; {lm.arch.family} is a masked LM")
            lm.check_layer(self.layers[0])
            if not lm.arch.gated and not _first_bias(lm, lm.check_layer(self.layers[0])):
                raise ValueError(
                    f"{lm.arch.family}'s first FFN linear has no bias; T-Patcher needs one (or a gated FFN)"
                )
        return self


def _first_bias(lm: LM, layer: int) -> str | None:
    path = next(iter(lm.key_paths(layer).values()))
    name = f"{path}.bias"
    return name if name in dict(lm.model.named_parameters()) else None


def tpatcher_parameters(lm: LM, hp: TPatcherHyperParams) -> list[str]:
    """The parameters that grow: the layer's key module(s) (and their biases) and its values module."""
    layer = lm.check_layer(hp.layers[0])
    names = [f"{path}.weight" for path in lm.key_paths(layer).values()] + [f"{lm.values_path(layer)}.weight"]
    bias = _first_bias(lm, layer)
    return names + ([bias] if bias and not lm.arch.gated else [])


@torch.no_grad()
def memory_inputs(lm: LM, layer: int, source: str, tokens: int) -> torch.Tensor:
    """`[tokens, d_model]` float32: the FFN input of `layer` at `tokens` corpus tokens (cached on the model)."""
    key = ("tpatcher_memory", layer, source, tokens)
    if key not in lm.memo:
        rows = []
        seq_len = min(128, getattr(lm.model.config, "max_position_embeddings", 128) or 128)
        for ids, mask in statistics_batches(lm, source, tokens, seq_len, 8):
            with Trace(lm, read=[("ffn_in", layer)], stop=True) as tr:
                lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
            rows.append(tr["ffn_in", layer][mask.bool().to(tr["ffn_in", layer].device)].float().cpu())
        lm.memo[key] = torch.cat(rows)
    return lm.memo[key]


def tpatcher_prepare(lm: LM, hp: TPatcherHyperParams) -> None:
    memory_inputs(lm, lm.check_layer(hp.layers[0]), hp.stats_source, hp.stats_tokens)


class _Patch(torch.nn.Module):
    """n new memories: keys `[n, d]`, key biases `[n]` (non-gated) or up rows `[n, d]` (gated), values `[n, d]`."""

    def __init__(self, q: torch.Tensor, gated: bool, activation: str, seed: int) -> None:
        super().__init__()
        key = q / (q.norm(dim=-1, keepdim=True) ** 2)
        self.key = torch.nn.Parameter(key.clone())
        self.gated = gated
        self.second = torch.nn.Parameter(key.clone() if gated else torch.zeros(len(q)))
        noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
        self.noise = torch.nn.Parameter(noise)
        self.amplitude = torch.nn.Parameter(torch.full((q.shape[-1],), VALUE_AMPLITUDE))
        self.act = ACT2FN[activation]

    def preactivation(self, q: torch.Tensor) -> torch.Tensor:
        return q @ self.key.T + (0 if self.gated else self.second)

    def coefficients(self, q: torch.Tensor) -> torch.Tensor:
        a = self.act(q @ self.key.T if self.gated else self.preactivation(q))
        return a * (q @ self.second.T) if self.gated else a

    def values(self) -> torch.Tensor:
        return self.noise * self.amplitude

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.coefficients(q) @ self.values()


class _Hooked:
    """While active, the layer's FFN output gains the patch's contribution (read from the FFN's own input)."""

    def __init__(self, lm: LM, layer: int, patch: _Patch) -> None:
        self.keys = lm.module(next(iter(lm.key_paths(layer).values())))
        self.values = lm.module(lm.values_path(layer))
        self.patch, self.q = patch, None
        self.handles: list = []

    def __enter__(self) -> "_Hooked":
        self.handles = [self.keys.register_forward_pre_hook(self._read), self.values.register_forward_hook(self._add)]
        return self

    def _read(self, module, args):
        self.q = args[0]

    def _add(self, module, args, output):
        return output + self.patch(self.q.float()).to(output.dtype)

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _memory_loss(a_mem: torch.Tensor, a_edit: torch.Tensor) -> torch.Tensor:
    """Mean over memories of the two top-k exp losses; a_mem `[N, n]`, a_edit `[n]`."""
    k = min(TOP_MEMORY, a_mem.shape[0])
    above = torch.exp(a_mem - a_edit + GAMMA).topk(k, dim=0).values.mean(0)
    silent = torch.exp(a_mem - BETA).topk(k, dim=0).values.mean(0)
    return (above + silent).mean()


def tpatcher_edit(lm: LM, requests: Sequence[EditRequest], hp: TPatcherHyperParams) -> EditOutcome:
    """Add memories for each request in turn (module docstring); `records` lists the memories added per request."""
    layer = lm.check_layer(hp.layers[0])
    memory = memory_inputs(lm, layer, hp.stats_source, hp.stats_tokens).to(lm.device)
    activation = lm.arch.activation(lm.model.config)
    added, steps = [], 0
    lm.model.requires_grad_(False)
    for index, request in enumerate(requests):
        n, used, q_edit = _patch_one(lm, layer, request, memory, activation, hp, seed=hp.seed + index)
        added.append(n)
        steps += used
        if q_edit is not None:  # later requests' memories stay silent on this one's inputs
            memory = torch.cat([memory, q_edit])
    return EditOutcome(steps=steps, records=added, result={"memories_added": added, "layer": layer})


def _patch_one(
    lm: LM, layer: int, request: EditRequest, memory: torch.Tensor, activation: str, hp: TPatcherHyperParams, seed: int
) -> tuple[int, int, torch.Tensor | None]:
    enc = encode_target(lm, request.rewrite_prompt, request.target_new)
    ids = torch.tensor([enc.input_ids], device=lm.device)
    positions = torch.tensor(enc.positions, device=lm.device)
    targets = torch.tensor(enc.target_ids, device=lm.device)
    with torch.no_grad(), Trace(lm, read=[("ffn_in", layer), *([("residual", layer - 1)] if layer else [])]) as tr:
        logits = lm.model(input_ids=ids).logits[0, positions]
    inputs = tr["ffn_in", layer][0].float()
    wrong = (logits.argmax(-1) != targets).nonzero().flatten()[: hp.max_neurons]
    if not len(wrong):  # the model already predicts the target: no memory (the reference's rule)
        return 0, 0, None
    entry = tr["residual", layer - 1] if layer else None
    patch = _Patch(inputs[positions[wrong]], lm.arch.gated, activation, seed).to(lm.device)
    held = max(1, int(HELD_OUT * len(memory)))
    train_mem, val_mem = memory[:-held], memory[-held:]
    optimizer = torch.optim.Adam(patch.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold=0.05)
    best, step = float("inf"), 0
    as_tuple = layer_returns_tuple(lm)
    with _Hooked(lm, layer, patch):
        for step in range(1, hp.max_steps + 1):
            with replayed_layers(lm, layer, entry, as_tuple) if entry is not None else nullcontext():
                out = lm.unembed(lm.model.base_model(input_ids=ids).last_hidden_state[0, positions]).float()
            edit_loss = F.cross_entropy(out, targets, label_smoothing=EDIT_SMOOTHING)
            a_edit = patch.preactivation(inputs[positions[wrong]]).diagonal()
            loss = edit_loss + torch.exp(ACT_MARGIN - a_edit).mean()
            loss = loss + hp.memory_weight * _memory_loss(patch.preactivation(train_mem), a_edit)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(patch.parameters(), CLIP)
            optimizer.step()
            if step % 25:
                continue
            scheduler.step(float(edit_loss.detach()))
            fixed = bool((out.argmax(-1) == targets).all())
            if step >= 100 and fixed:
                with torch.no_grad():
                    check = float(
                        _memory_loss(
                            patch.preactivation(val_mem), patch.preactivation(inputs[positions[wrong]]).diagonal()
                        )
                    )
                if check > best - 1e-3:
                    break
                best = check
    _merge(lm, layer, patch)
    return len(wrong), step, inputs.detach()


@torch.no_grad()
def _merge(lm: LM, layer: int, patch: _Patch) -> None:
    """Append the trained memories to the layer's modules (one row of each key module, one value vector)."""
    paths = lm.key_paths(layer)
    additions = {f"{lm.values_path(layer)}.weight": patch.values().detach()}
    if lm.arch.gated:
        additions[f"{paths['gate']}.weight"] = patch.key.detach()
        additions[f"{paths['up']}.weight"] = patch.second.detach()
    else:
        path = next(iter(paths.values()))
        additions[f"{path}.weight"] = patch.key.detach()
        additions[f"{path}.bias"] = patch.second.detach()
    grow(lm, additions)
