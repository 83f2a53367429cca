"""Teacher-forced scoring of a target after a prompt, batched; the one place prompts meet tokens.

Causal models read `prompt + " " + target` and score the target's tokens from the position
after the prompt, as the reference code does. The target ids are taken from the joint
tokenisation when it starts with the prompt's own ids (so merges across the boundary cannot
shift the target), else from tokenising `" " + target` alone. Masked models (BERT) read
`prompt [MASK]×n` and score the target tokens at the mask positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.lm import LM


@dataclass(frozen=True)
class EncodedTarget:
    """One (prompt, target) pair as ids: the model reads `input_ids`; the logits at
    `positions[j]` are scored against `target_ids[j]`."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    target_ids: tuple[int, ...]


def _strip_trailing_specials(ids: list[int], special: set[int]) -> list[int]:
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return ids


def encode_target(lm: LM, prompt: str, target: str) -> EncodedTarget:
    """Token ids for scoring `target` after `prompt` (see module docstring)."""
    tok = lm.tokenizer
    special = set(tok.all_special_ids)
    if lm.arch.objective == "masked":
        target_ids = tok(target.strip(), add_special_tokens=False)["input_ids"]
        masks = " ".join([tok.mask_token] * len(target_ids))
        input_ids = tok(f"{prompt} {masks}")["input_ids"]
        positions = [i for i, t in enumerate(input_ids) if t == tok.mask_token_id][-len(target_ids) :]
        return EncodedTarget(tuple(input_ids), tuple(positions), tuple(target_ids))

    prompt_ids = _strip_trailing_specials(tok(prompt)["input_ids"], special)
    joint = _strip_trailing_specials(tok(prompt + " " + target.strip())["input_ids"], special)
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        target_ids = joint[len(prompt_ids) :]
    else:
        target_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    full = list(prompt_ids) + list(target_ids)
    predicting = range(len(prompt_ids) - 1, len(full) - 1)  # the positions whose next token is a target token
    return EncodedTarget(tuple(full), tuple(predicting), tuple(target_ids))


@dataclass
class TargetBatch:
    """Right-padded tensors for a list of `EncodedTarget`s.

    input_ids, attention_mask: `[N, T]`; positions, target_ids, target_mask: `[N, L]`
    (L = longest target; padded entries have target_mask False).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor

    @classmethod
    def collate(cls, items: Sequence[EncodedTarget], pad_id: int) -> "TargetBatch":
        n, t = len(items), max(len(e.input_ids) for e in items)
        length = max(len(e.target_ids) for e in items)
        input_ids = torch.full((n, t), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        positions = torch.zeros((n, length), dtype=torch.long)
        target_ids = torch.zeros((n, length), dtype=torch.long)
        target_mask = torch.zeros((n, length), dtype=torch.bool)
        for i, e in enumerate(items):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[i, : len(e.input_ids)] = 1
            positions[i, : len(e.positions)] = torch.tensor(e.positions)
            target_ids[i, : len(e.target_ids)] = torch.tensor(e.target_ids)
            target_mask[i, : len(e.target_ids)] = True
        return cls(input_ids, attention_mask, positions, target_ids, target_mask)

    def to(self, device: torch.device) -> "TargetBatch":
        return TargetBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass
class TokenScores:
    """Per-token results for a batch, all `[N, L]` and valid where `mask`: the target tokens'
    `logprobs`, the model's `argmax` token ids at those positions, and `argmax_hit` (argmax == target)."""

    logprobs: torch.Tensor
    argmax: torch.Tensor
    argmax_hit: torch.Tensor
    mask: torch.Tensor

    @property
    def nll(self) -> torch.Tensor:
        """Mean negative log-probability per target token, `[N]` (nats)."""
        return -(self.logprobs * self.mask).sum(1) / self.mask.sum(1)

    @property
    def token_accuracy(self) -> torch.Tensor:
        """Fraction of target tokens that are the argmax given the true prefix, `[N]`."""
        return (self.argmax_hit & self.mask).sum(1) / self.mask.sum(1)

    def predicted_ids(self) -> list[list[int]]:
        """Per row, the argmax token ids at the target positions (padding dropped)."""
        return [row[keep].tolist() for row, keep in zip(self.argmax, self.mask)]


def score_batch(lm: LM, batch: TargetBatch) -> TokenScores:
    """Forward `batch` and gather the target tokens' log-probabilities (keeps the autograd graph)."""
    batch = batch.to(lm.device)
    rows = torch.arange(batch.input_ids.shape[0], device=lm.device)[:, None]
    if lm.arch.objective == "causal":
        # unembed only the scored positions: [N, L, vocab] instead of [N, T, vocab]
        hidden = lm.model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        picked = lm.unembed(hidden[rows.to(hidden.device), batch.positions.to(hidden.device)])
    else:
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = logits[rows.to(logits.device), batch.positions.to(logits.device)]  # [N, L, vocab]
    picked = picked.float()
    batch = batch.to(picked.device)  # a split model's logits leave on its last device
    logprobs = F.log_softmax(picked, dim=-1).gather(-1, batch.target_ids[..., None])[..., 0]
    argmax = picked.argmax(-1)
    return TokenScores(logprobs * batch.target_mask, argmax, argmax == batch.target_ids, batch.target_mask)


@torch.no_grad()
def score_targets(lm: LM, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> TokenScores:
    """Score `targets[i]` after `prompts[i]` for all i, `batch_size` pairs per forward pass."""
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets; expected one target per prompt")
    encoded = [encode_target(lm, p, t) for p, t in zip(prompts, targets)]
    pad = lm.tokenizer.pad_token_id
    chunks = [
        score_batch(lm, TargetBatch.collate(encoded[i : i + batch_size], pad))
        for i in range(0, len(encoded), batch_size)
    ]
    width = max(c.mask.shape[1] for c in chunks)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([F.pad(getattr(c, name).cpu(), (0, width - c.mask.shape[1])) for c in chunks])

    return TokenScores(cat("logprobs"), cat("argmax"), cat("argmax_hit"), cat("mask"))


def target_nll(lm: LM, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token NLL of each target after its prompt, `[N]` (nats)."""
    return score_targets(lm, prompts, targets, batch_size).nll
