"""The FFN of one layer seen as a key-value memory: `FFN(h) = f(h·Kᵀ)·V`.

Families with a post-FFN norm (Gemma-2/3, OLMo-2: `Architecture.post_ffn_norm`) add
`norm(f(h·Kᵀ)·V)` to the residual instead. That norm is an RMSNorm with gain `g`:
`norm(x) = g ⊙ x / rms(x)`, so memory cell i pushes the residual along `g ⊙ v_i`, scaled by
`m_i / rms(FFN output)`, a positive factor shared by every cell at that token. `FFNMemory.written`
gives those directions; `written_output` and `output_for_written` map a values-module output to
what reaches the residual and back (the editors use them to turn residual-space goals into
values-module targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .lm import LM, tensor_attr
from .tracing import Trace


def weight_as_out_in(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The module's weight as `[out, in]`, whatever its storage orientation (a view, not a copy)."""
    weight = tensor_attr(module, "weight")
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
    post_norm_gain: torch.Tensor | None = None  # `[d_model]` gain of the post-FFN norm, if any

    @property
    def d_ff(self) -> int:
        return self.values.shape[0]

    @property
    def written(self) -> torch.Tensor:
        """`[d_ff, d_model]`: the direction each cell pushes the residual stream, `v_i ⊙ g` after a
        post-FFN norm with gain `g` (up to a positive per-token factor), else `v_i` itself."""
        return self.values if self.post_norm_gain is None else self.values * self.post_norm_gain

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
    return FFNMemory(layer=layer, keys=keys, values=values, post_norm_gain=post_norm_gain(lm, layer, "ffn"))


def _post_norm(lm: LM, layer: int, sublayer: Literal["ffn", "attn"]) -> nn.Module | None:
    path = lm.arch.post_ffn_norm if sublayer == "ffn" else lm.arch.post_attn_norm
    return None if path is None else lm.layer_module(layer, path)


def post_norm_gain(lm: LM, layer: int, sublayer: Literal["ffn", "attn"] = "ffn") -> torch.Tensor | None:
    """`[d_model]` gain of the RMSNorm after the FFN ("ffn") or attention ("attn") output of `layer`,
    None when the family adds that output to the residual as it is."""
    norm = _post_norm(lm, layer, sublayer)
    return None if norm is None else tensor_attr(norm, "weight").detach() + lm.arch.norm_weight_offset


def written_output(lm: LM, layer: int, output: torch.Tensor, sublayer: Literal["ffn", "attn"] = "ffn") -> torch.Tensor:
    """What the sub-layer adds to the residual when its output projection (values module, or attention
    output projection) gives `output` `[..., d_model]`: the post-norm of it, or `output` itself."""
    norm = _post_norm(lm, layer, sublayer)
    if norm is None:
        return output
    gain = tensor_attr(norm, "weight")
    return norm(output.to(gain.device, gain.dtype)).to(output.device, output.dtype)


def output_for_written(
    lm: LM, layer: int, written: torch.Tensor, current: torch.Tensor, sublayer: Literal["ffn", "attn"] = "ffn"
) -> torch.Tensor:
    """An output-projection output `[N, d_model]` whose `written_output` is as close to `written` `[N, d_model]`
    as the norm allows, at the RMS of `current` `[N, d_model]` (the output it replaces).

    Without a post-norm that is `written` itself. Through an RMSNorm with gain g only the points
    `g ⊙ y` with rms(y) = 1 can be written (an ellipsoid); the result is `rms(current) · y` for the y whose
    write is nearest to `written` in the residual stream (`nearest_on_norm_image`; exactly `written` when it
    lies on the image). The norm forgets its input's scale; the editors keep the current one, and `current`'s
    share of the components the norm ignores (a gain of exactly 0).
    """
    gain = post_norm_gain(lm, layer, sublayer)
    if gain is None:
        return written
    current = current.to(torch.float64)
    y = nearest_on_norm_image(gain.to(torch.float64), written.to(torch.float64), current)
    return (current.pow(2).mean(-1, keepdim=True).sqrt() * y).to(written.dtype)


def nearest_on_norm_image(
    gain: torch.Tensor, written: torch.Tensor, like: torch.Tensor | None = None, iterations: int = 200
) -> torch.Tensor:
    """`[N, d]`: the y with rms(y) = 1 minimising ‖g ⊙ y − w‖ for gain g `[d]` and each row w of `written`.

    Stationarity gives `y = g ⊙ w / (g² + μ)`, and the minimum is the root with μ > −min g² of
    Σ (g w)² / (g² + μ)² = d, which decreases in μ: found by bisection, per row. Where the gain is exactly 0
    (Gemma-3-270M's post-FFN norms have such entries at layers 1, 3 and 4) the norm writes nothing but still
    counts the component in its RMS: those components are slack. A row whose `w / g` has Σ ≤ d is then
    written exactly, the slack going to those components in proportion to `like` `[N, d]` (evenly without it).
    Rescaling `w / g` to rms 1 instead (what kvedit did before) keeps the write's direction in the pre-gain
    space, not the residual's, and loses most of a change as large as the write itself (docs/models.md).
    """
    writable = gain != 0
    if not writable.any():
        raise ValueError("every gain of the norm is 0: it writes nothing, so no output can be solved for")
    d = written.shape[-1]
    g2 = torch.where(writable, gain * gain, 0.0)
    gw = torch.where(writable, gain * written, 0.0)  # [N, d]

    def solution(mu: torch.Tensor) -> torch.Tensor:  # y on the writable components for multipliers mu [N]
        return torch.where(writable, gw / (g2 + mu[..., None]), 0.0)

    slack = not bool(writable.all())
    rows = written.shape[:-1]
    low = torch.full(rows, 0.0 if slack else -float(g2[writable].min()), dtype=written.dtype, device=written.device)
    high = (gw.norm(dim=-1) / d**0.5).clamp_min(1e-300)  # there Σ y² ≤ ‖g w‖² / high² = d
    if slack:  # μ = 0 where w/g already fits: written exactly, the rest of the RMS in the ignored components
        fits = solution(torch.zeros_like(low)).pow(2).sum(-1) <= d
        high = torch.where(fits, 0.0, high)
    for _ in range(iterations):
        mid = (low + high) / 2
        too_long = solution(mid).pow(2).sum(-1) > d
        low, high = torch.where(too_long, mid, low), torch.where(too_long, high, mid)
    y = solution(high)
    if slack:
        reference = torch.ones_like(written) if like is None else like.to(written)
        fill = torch.where(writable, 0.0, reference.abs() + 1e-12)  # `like`'s share, even where it has none
        room = (d - y.pow(2).sum(-1, keepdim=True)).clamp_min(0.0)
        y = y + torch.where(reference < 0, -fill, fill) * (room / fill.pow(2).sum(-1, keepdim=True)).sqrt()
    # at the root rms(y) = 1 to float precision; when w has no component along the smallest gains the root can
    # lie at μ = −min g² itself (the trust-region "hard case"), and the rescale keeps rms(y) = 1 anyway
    return y / y.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(y.dtype).tiny)


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
