"""Read and add to hidden states at chosen layers and token positions during a forward pass.

Sites name what to touch, as `(kind, layer)`:

- ``"residual"``      output of the whole layer (the residual stream after it), `[B, T, d_model]`
- ``"attn_out"``      output of the attention output projection, `[B, T, d_model]`
- ``"ffn_out"``       output of the values module, `[B, T, d_model]` (before the post-FFN norm of
                      families that have one: Gemma-2/3, OLMo-2)
- ``"ffn_write"``     what the FFN adds to the residual: the post-FFN norm's output, or ``ffn_out``
                      when the family has no such norm, `[B, T, d_model]`
- ``"attn_write"``    the same for attention (after the post-attention norm, if any), `[B, T, d_model]`
- ``"coefficients"``  input of the values module: memory coefficients `m = f(h·Kᵀ)`, `[B, T, d_ff]`
- ``"key:<role>"``    output of a key module (`h·Kᵀ` before the activation), `[B, T, d_ff]`
- ``"attn_heads"``    input of the attention output projection (concatenated heads), `[B, T, d_attn]`
- ``"attn_in"``       input of the attention module (the normalised hidden state it reads), `[B, T, d_model]`
- ``"ffn_in"``        input of the FFN's key module(s) (the normalised hidden state it reads), `[B, T, d_model]`

Besides reading and adding, `scale` multiplies chosen units of a site (e.g. one memory coefficient) by
factors (0 switches a memory off).

Example::

    with Trace(lm, read=[("coefficients", 3)], add={("ffn_out", 5): Addition(delta, positions)}) as tr:
        lm.model(**batch)
    m = tr["coefficients", 3]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lm import LM

Site = tuple[str, int]


class StopForward(Exception):
    """Raised inside the forward pass once every requested site has been read (`stop=True`)."""


@dataclass
class Addition:
    """A vector to add to a site's output.

    delta: `[d]` (same for every sequence), `[B, d]` (one per sequence) or `[B, T, d]` (everywhere).
    positions: `[B]` token index per sequence; None adds at every position (`delta` broadcast).
    """

    delta: torch.Tensor
    positions: torch.Tensor | None = None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.delta.to(hidden.device, hidden.dtype)
        if self.positions is None:
            return hidden + delta
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        if delta.dim() == 1:
            delta = delta.expand(hidden.shape[0], -1)
        # out-of-place so autograd sees the addition
        return hidden.index_put((batch, self.positions.to(hidden.device)), delta, accumulate=True)


@dataclass
class Replacement:
    """Put `values` (`[B, d]`, one vector per sequence) at token `positions` (`[B]`) in place of what the site
    computed there, e.g. a clean run's state restored into corrupted runs (causal tracing).
    rows: `[n]` sequence indices to replace in, with `values` `[n, d]` and `positions` `[n]` (None: every row)."""

    values: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor | None = None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        batch = torch.arange(hidden.shape[0]) if self.rows is None else self.rows
        index = (batch.to(hidden.device), self.positions.to(hidden.device))
        return hidden.index_put(index, self.values.to(hidden.device, hidden.dtype))


@dataclass
class Scaling:
    """Multiply units `units` (`[n]` indices into the last dimension) of a site by `factors` (`[n]`),
    at every position, or at token `positions` (`[B]`, one per sequence) only."""

    units: torch.Tensor
    factors: torch.Tensor
    positions: torch.Tensor | None = None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        scale[self.units.to(hidden.device)] = self.factors.to(hidden.device, hidden.dtype)
        if self.positions is None:
            return hidden * scale
        factors = torch.ones_like(hidden)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        factors[batch, self.positions.to(hidden.device)] = scale
        return hidden * factors


def _resolve(lm: LM, site: Site) -> tuple[nn.Module, str]:
    """The module to hook for a site, and whether its input ("pre") or output ("post") is meant."""
    kind, layer = site
    if kind == "residual":
        return lm.module(f"{lm.arch.layers}.{lm.check_layer(layer)}"), "post"
    if kind == "attn_out":
        return lm.module(lm.attn_out_path(layer)), "post"
    if kind == "ffn_out":
        return lm.module(lm.values_path(layer)), "post"
    if kind in ("ffn_write", "attn_write"):
        norm = lm.arch.post_ffn_norm if kind == "ffn_write" else lm.arch.post_attn_norm
        if norm is not None:
            return lm.layer_module(layer, norm), "post"
        return lm.module(lm.values_path(layer) if kind == "ffn_write" else lm.attn_out_path(layer)), "post"
    if kind == "coefficients":
        return lm.module(lm.values_path(layer)), "pre"
    if kind == "attn_heads":
        return lm.module(lm.attn_out_path(layer)), "pre"
    if kind == "attn_in":
        if lm.arch.attn is None:
            raise ValueError(f"the architecture table names no attention module for {lm.arch.family}")
        return lm.layer_module(layer, lm.arch.attn), "pre"
    if kind == "ffn_in":
        return lm.module(next(iter(lm.key_paths(layer).values()))), "pre"
    if kind.startswith("key:"):
        role = kind.split(":", 1)[1]
        return lm.module(lm.key_paths(layer, (role,))[role]), "post"
    raise ValueError(
        f"unknown site kind {kind!r}; expected residual, attn_out, ffn_out, ffn_write, attn_write, coefficients, "
        "attn_heads, attn_in, ffn_in or key:<role>"
    )


class Trace:
    """Context manager hooking the requested sites; read results with `trace[kind, layer]`.

    read: sites whose tensor is kept (full `[B, T, d]`, or `[B, d]` when `positions` is given).
    add: site -> `Addition` applied to that site's tensor before the rest of the model sees it.
    replace: site -> `Replacement` of some of that site's vectors (before any addition).
    scale: site -> `Scaling` applied to that site's tensor (after any addition, before reading).
    positions: `[B]` token index per sequence to keep for reads (None keeps every position).
    detach: keep read tensors out of the autograd graph (default). Set False to backprop through them.
    stop: end the forward pass (raise `StopForward`, swallowed on exit) once every read is done.
    """

    def __init__(
        self,
        lm: LM,
        read: Iterable[Site] = (),
        add: Mapping[Site, Addition] | None = None,
        positions: torch.Tensor | None = None,
        detach: bool = True,
        stop: bool = False,
        scale: Mapping[Site, Scaling] | None = None,
        replace: Mapping[Site, Replacement] | None = None,
    ) -> None:
        self.lm = lm
        self.reads = [(str(k), lm.check_layer(l)) for k, l in read]
        self.adds = {(str(k), lm.check_layer(l)): a for (k, l), a in (add or {}).items()}
        self.scales = {(str(k), lm.check_layer(l)): a for (k, l), a in (scale or {}).items()}
        self.replaces = {(str(k), lm.check_layer(l)): r for (k, l), r in (replace or {}).items()}
        self.positions = positions
        self.detach = detach
        self.stop = stop
        self.values: dict[Site, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._batch_shape: tuple[int, ...] = ()

    def __getitem__(self, site: Site) -> torch.Tensor:
        kind, layer = site
        return self.values[(kind, self.lm.check_layer(layer))]

    def _keep(self, site: Site, hidden: torch.Tensor) -> None:
        if self.positions is not None:
            batch = torch.arange(hidden.shape[0], device=hidden.device)
            hidden = hidden[batch, self.positions.to(hidden.device)]
        self.values[site] = hidden.detach() if self.detach else hidden
        if self.stop and len(self.values) == len(self.reads):
            raise StopForward

    def _transform(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.dim() == 2  # some FFNs (OPT) see tokens flattened to [B*T, d]
        if flat:
            hidden = hidden.view(*self._batch_shape, hidden.shape[-1])
        if site in self.replaces:
            hidden = self.replaces[site].apply(hidden)
        if site in self.adds:
            hidden = self.adds[site].apply(hidden)
        if site in self.scales:
            hidden = self.scales[site].apply(hidden)
        if site in self.reads:
            self._keep(site, hidden)
        return hidden.reshape(-1, hidden.shape[-1]) if flat else hidden

    def _record_batch_shape(self, mod, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._batch_shape = tuple(hidden.shape[:2])

    def __enter__(self) -> "Trace":
        sites = list(dict.fromkeys([*self.reads, *self.adds, *self.scales, *self.replaces]))
        for layer in sorted({layer for _, layer in sites}):
            block = self.lm.module(f"{self.lm.arch.layers}.{layer}")
            self._handles.append(block.register_forward_pre_hook(self._record_batch_shape, with_kwargs=True))
        for site in sites:
            module, where = _resolve(self.lm, site)
            if where == "pre":

                def pre_hook(mod, args, kwargs, site=site):
                    if not args:  # attention modules of some families take hidden_states by keyword
                        return args, {**kwargs, "hidden_states": self._transform(site, kwargs["hidden_states"])}
                    return (self._transform(site, args[0]), *args[1:]), kwargs

                self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def post_hook(mod, args, output, site=site):
                    if isinstance(output, tuple):
                        return (self._transform(site, output[0]), *output[1:])
                    return self._transform(site, output)

                self._handles.append(module.register_forward_hook(post_hook))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is StopForward
