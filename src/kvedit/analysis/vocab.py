"""Reading vectors in the vocabulary: unembedding, the final norm, the logit lens, token strings."""

from __future__ import annotations

import torch

from ..models.lm import LM, tensor_attr


def unembedding(lm: LM) -> torch.Tensor:
    """The output embedding matrix E, `[vocab, d_model]` (the unembedding module's weight, no bias)."""
    return tensor_attr(lm.module(lm.arch.unembed), "weight")


def final_norm(lm: LM, hidden: torch.Tensor) -> torch.Tensor:
    """The model's final norm (the MLM head's transform for masked LMs) applied to `hidden` `[..., d_model]`."""
    return lm.module(lm.arch.final_norm)(hidden)


@torch.no_grad()
def project(lm: LM, vectors: torch.Tensor, apply_final_norm: bool = False) -> torch.Tensor:
    """`E · v` for each vector `[..., d_model]` (optionally `E · norm(v)`), as float32 `[..., vocab]`.

    No bias is added: it is the same for every vector, so it would only shift the ranking toward
    tokens the model favours anyway.
    """
    weight = unembedding(lm)
    x = vectors.to(weight.dtype)
    if apply_final_norm:
        x = final_norm(lm, x)
    return (x @ weight.T).float()


@torch.no_grad()
def logit_lens(lm: LM, residual: torch.Tensor) -> torch.Tensor:
    """Logits the model would output if its residual stream ended here: unembed(final_norm(residual)),
    bias and any final-logit soft-cap included, `[..., vocab]` float32. At the last layer this is the model's
    own output."""
    return lm.unembed(final_norm(lm, residual.to(unembedding(lm).dtype))).float()


def token_strings(lm: LM) -> list[str]:
    """Every token id of the unembedding decoded alone (BPE tokens keep their leading space); ids the
    tokenizer does not know (padding rows of the embedding) read `<id>`."""
    tok = lm.tokenizer
    known = len(tok)
    return [str(tok.decode([i])) if i < known else f"<{i}>" for i in range(unembedding(lm).shape[0])]


def show(token: str) -> str:
    """A token for tables: quoted with visible leading/trailing spaces and escaped newlines and pipes."""
    return repr(token).replace("|", "\\|")
