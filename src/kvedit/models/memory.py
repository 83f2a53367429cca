"""The FFN of one layer seen as a key-value memory: `FFN(h) = f(h·Kᵀ)·V`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .lm import LM
from .tracing import Trace


def weight_as_out_in(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The module's weight as `[out, in]`, whatever its storage orientation (a view, not a copy)."""
    weight = module.weight
    return weight.T if transposed else weight


@dataclass
class FFNMemory:
    """Keys and values of layer `layer` as `[d_ff, d_model]` views of the live weights.

    keys: by role ("key"; or "gate" and "up" for gated FFNs), row i = key of memory cell i.
    values: row i = value of memory cell i (the direction cell i writes into the residual).
    Both are views: editing them in place edits the model.
    """

    layer: int
    keys: dict[str, torch.Tensor]
    values: torch.Tensor

    @property
    def d_ff(self) -> int:
        return self.values.shape[0]

    @property
    def key(self) -> torch.Tensor:
        """The key matrix that decides *which* cells fire: "key", or "gate" for gated FFNs."""
        return self.keys["gate"] if "gate" in self.keys else self.keys["key"]


def ffn_memory(lm: LM, layer: int) -> FFNMemory:
    """The key-value view of layer `layer`'s FFN."""
    layer = lm.check_layer(layer)
    transposed = lm.arch.transposed
    keys = {role: weight_as_out_in(lm.module(path), transposed) for role, path in lm.key_paths(layer).items()}
    # The values module maps d_ff -> d_model, so its [out, in] weight is [d_model, d_ff].
    values = weight_as_out_in(lm.module(lm.values_path(layer)), transposed).T
    return FFNMemory(layer=layer, keys=keys, values=values)


@torch.no_grad()
def memory_coefficients(
    lm: LM, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 16
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Memory coefficients (the values module's input) of every token of every prompt.

    Returns ({layer: `[N, T, d_ff]` float32}, attention mask `[N, T]`), prompts right-padded to
    the longest one; padded positions hold whatever the model computed there (mask them out).
    """
    tok = lm.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="right")
    out: dict[int, list[torch.Tensor]] = {lm.check_layer(l): [] for l in layers}
    for start in range(0, len(prompts), batch_size):
        batch = {k: v[start : start + batch_size].to(lm.device) for k, v in enc.items()}
        with Trace(lm, read=[("coefficients", l) for l in out], stop=True) as tr:
            lm.model(**batch)
        for l in out:
            out[l].append(tr["coefficients", l].float().cpu())
    return {l: torch.cat(chunks) for l, chunks in out.items()}, enc["attention_mask"]
