"""Re-run only the part of a forward pass that an optimisation can change.

Target optimisation (ROME's v*, MEMIT's z, PMET's δ) adds a vector at one token of each row, at sites in
layers `start` and above, and runs the same rows for tens of steps. Two parts of every pass never change:

- the tokens before the lookup token (they cannot see it): run once and kept as a KV cache;
- every layer below `start` (δ is not added there yet): the suffix tokens' input to layer `start` is
  computed once and replayed; the lower layers are swapped for stand-ins that pass it on.

A step then runs the suffix tokens (lookup token onward) through layers `start`… only. The result equals
the full forward pass up to float rounding (tested for every causal family).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .lm import LM, cache_keyword, returned_cache
from .tracing import StopForward


class _Replay(nn.Module):
    """Stands in for a layer below the start layer: passes its input on, or (the last one below the start)
    returns the stored input of the start layer. Returns a 1-tuple where the family's layers return tuples."""

    def __init__(self, output: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.output, self.as_tuple = output, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.output is None else self.output
        return (out,) if self.as_tuple else out


@contextmanager
def replayed_layers(lm: LM, start: int, entry: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Within the block, layers `0 … start-1` are stand-ins and layer `start` receives `entry` `[B, T, d]`
    as its input. The real layers are put back on exit, whatever happens."""
    layers = lm.layer_list()
    originals = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _Replay(entry if i == start - 1 else None, as_tuple)
        yield
    finally:
        for i, module in enumerate(originals):
            layers[i] = module


def appendable_copy(cache: Any) -> Any:
    """A copy of a KV cache that a forward can append to without changing `cache`. The layers' key/value tensors
    are shared (an update concatenates them into new tensors and rebinds), their other tensors (counters) cloned;
    a cache without per-layer objects is deep-copied."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return copy.deepcopy(cache)
    new = copy.copy(cache)
    new.layers = []
    for layer in layers:
        fresh = copy.copy(layer)
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and name not in ("keys", "values"):
                setattr(fresh, name, value.clone())
        new.layers.append(fresh)
    return new


class SplitBatch:
    """Rows split at their lookup token, and at layer `start`.

    rows: token ids per row; lookups: lookup index per row (suffix position 0 is every row's lookup);
    start: the lowest layer anything is added to (0 runs every layer each step).
    """

    def __init__(self, lm: LM, rows: Sequence[Sequence[int]], lookups: Sequence[int], start: int = 0) -> None:
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.lm, self.lookups, self.start = lm, list(lookups), lm.check_layer(start) if start else 0
        self.width = max(self.lookups)  # left-padded prefix width
        suffix_len = max(len(r) - p for r, p in zip(rows, lookups))
        n = len(rows)
        self.prefix = torch.full((n, self.width), pad, dtype=torch.long)
        self.prefix_mask = torch.zeros((n, self.width), dtype=torch.long)
        self.suffix = torch.full((n, suffix_len), pad, dtype=torch.long)
        self.suffix_mask = torch.zeros((n, suffix_len), dtype=torch.long)
        for i, (row, p) in enumerate(zip(rows, lookups)):
            if p:
                self.prefix[i, self.width - p :] = torch.tensor(row[:p])
                self.prefix_mask[i, self.width - p :] = 1
            self.suffix[i, : len(row) - p] = torch.tensor(row[p:])
            self.suffix_mask[i, : len(row) - p] = 1
        self.suffix_positions = torch.tensor(self.lookups)[:, None] + torch.arange(suffix_len)
        self.cache = None
        self.entry: torch.Tensor | None = None
        self.as_tuple = False
        with torch.no_grad():
            if self.width:
                self.cache = returned_cache(
                    lm.model.base_model(
                        input_ids=self.prefix.to(lm.device),
                        attention_mask=self.prefix_mask.to(lm.device),
                        position_ids=(self.prefix_mask.cumsum(-1) - 1).clamp(min=0).to(lm.device),
                        use_cache=True,
                    )
                )
            if self.start:
                self._store_entry()

    def select(self, rows: Sequence[int]) -> "SplitBatch":
        """The same batch with only `rows` (indices into this one's rows), sharing the computed prefix cache and
        layer input: no forward pass. Padding widths stay (the extra columns are masked)."""
        if self.cache is not None and getattr(self.cache, "layers", None) is None:  # cannot slice: compute again
            raise NotImplementedError("this transformers' KV cache has no per-layer batch selection")
        index = torch.tensor(list(rows), dtype=torch.long)
        new = copy.copy(self)
        new.lookups = [self.lookups[r] for r in rows]
        for name in ("prefix", "prefix_mask", "suffix", "suffix_mask", "suffix_positions"):
            setattr(new, name, getattr(self, name)[index])
        if self.cache is not None:
            new.cache = appendable_copy(self.cache)
            for layer in new.cache.layers:
                layer.batch_select_indices(index.to(self.lm.device))
        if self.entry is not None:
            new.entry = self.entry[index.to(self.entry.device)]
        return new

    def _store_entry(self) -> None:
        """Run the suffix through the layers below `start` once; keep layer `start`'s input."""
        below = self.lm.module(f"{self.lm.arch.layers}.{self.start - 1}")

        def keep(module, args, output):
            self.as_tuple = isinstance(output, tuple)
            self.entry = (output[0] if self.as_tuple else output).detach()
            raise StopForward

        handle = below.register_forward_hook(keep)
        try:
            self._run()
        except StopForward:
            pass
        finally:
            handle.remove()

    def _run(self):
        device = self.lm.device
        mask = torch.cat([self.prefix_mask, self.suffix_mask], dim=1) if self.width else self.suffix_mask
        # the pass appends the suffix to the cache it is given: give it a copy of the prefix cache (sharing its
        # tensors: the append makes new ones)
        cache = appendable_copy(self.cache) if self.cache is not None else None
        return self.lm.model.base_model(
            input_ids=self.suffix.to(device),
            attention_mask=mask.to(device),
            position_ids=self.suffix_positions.to(device),
            **cache_keyword(self.lm.model.base_model, cache),
            use_cache=cache is not None,
        )

    def forward_suffix(self) -> torch.Tensor:
        """Last hidden states of the suffix tokens, `[n, suffix_len, d_model]`."""
        if not self.start:
            return self._run().last_hidden_state
        assert self.entry is not None, "the prefix was not run: no entry states for layer `start`"
        with replayed_layers(self.lm, self.start, self.entry, self.as_tuple):
            return self._run().last_hidden_state


@torch.no_grad()
def layer_returns_tuple(lm: LM) -> bool:
    """Whether the family's decoder layers return a tuple (what `replayed_layers`' stand-ins must return too)."""
    seen: list[bool] = []
    handle = lm.module(f"{lm.arch.layers}.0").register_forward_hook(
        lambda module, args, output: seen.append(isinstance(output, tuple))
    )
    try:
        token = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
        lm.model.base_model(input_ids=torch.tensor([[token]], device=lm.device))
    finally:
        handle.remove()
    return seen[0]
