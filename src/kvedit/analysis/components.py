"""Attention vs FFN (PMET, Li et al. 2024, Fig. 2): how much each sub-layer changes what it reads.

For each prompt, at its last token and at every layer: the cosine similarity between a sub-layer's input
(the normalised hidden state the attention module, or the FFN's key modules, read) and its output (what it
writes into the residual stream), and the Jaccard overlap of the top-50 tokens of input and output
projected onto the input embeddings, as PMET's notebook computes them. Parallel-attention families
(GPT-J, GPT-NeoX) read one input for both; the sites follow the model. Where a family normalises a
sub-layer's output before the residual add (Gemma-3, OLMo-2), the output is taken after that norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.lm import LM, tensor_attr
from ..models.tracing import Trace

SUBLAYERS = {"attention": ("attn_in", "attn_write"), "ffn": ("ffn_in", "ffn_write")}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / |A ∪ B| of two id sets per row, `[N, k]` each → `[N]` (ids within a row are distinct)."""
    inter = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).float()
    return inter / (a.shape[1] + b.shape[1] - inter)


@torch.no_grad()
def component_similarity(
    lm: LM, prompts: Sequence[str], top: int = 50, batch_size: int = 16, progress: bool = True
) -> dict[int, dict[str, float]]:
    """Per layer: mean cosine similarity and mean top-`top` Jaccard overlap of input vs output, for the
    attention and FFN sub-layers, over `prompts` (keys `attention_cos`, `attention_jaccard`, `ffn_cos`,
    `ffn_jaccard`, `prompts`)."""
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    if lm.arch.objective != "causal":
        raise ValueError(f"{lm.arch.family} is a masked LM: the last token of a prompt is not where it predicts")
    embed = tensor_attr(lm.model.get_input_embeddings(), "weight")  # [vocab, d_model]
    layers = range(lm.num_layers)
    sums = {l: dict.fromkeys(("attention_cos", "attention_jaccard", "ffn_cos", "ffn_jaccard"), 0.0) for l in layers}
    tok = lm.tokenizer
    for start in tqdm(range(0, len(prompts), batch_size), desc="components", unit="batch", disable=not progress):
        chunk = list(prompts[start : start + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="right").to(lm.device)
        last = enc["attention_mask"].sum(1) - 1
        reads = [(site, l) for l in layers for pair in SUBLAYERS.values() for site in pair]
        with Trace(lm, read=reads, positions=last, stop=True) as tr:
            lm.model(**enc)
        for layer in layers:
            for name, (site_in, site_out) in SUBLAYERS.items():
                x, y = tr[site_in, layer].float(), tr[site_out, layer].float()  # [b, d_model]
                sums[layer][f"{name}_cos"] += float(F.cosine_similarity(x, y, dim=-1).sum())
                tx = (x @ embed.T.float()).topk(top, dim=-1).indices
                ty = (y @ embed.T.float()).topk(top, dim=-1).indices
                sums[layer][f"{name}_jaccard"] += float(jaccard(tx, ty).sum())
    return {l: {k: v / len(prompts) for k, v in s.items()} | {"prompts": len(prompts)} for l, s in sums.items()}
