"""Sentences from a corpus, tokenised into padded batches for streaming analyses.

Sources are those of the key statistics (`kvedit.editing.stats.corpus_texts`): a text file, a folder of
.txt files, `hf:<dataset>` where a hub is reachable, or `self` (text the model samples itself). Texts are
split into sentences (after `.`, `!` or `?` and a space); WikiText headings (`= … =`) and empty lines
are skipped by the reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..editing.stats import corpus_texts
from ..models.lm import LM

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def sentences(text: str, min_chars: int = 8) -> list[str]:
    """Split a paragraph into sentences; drop fragments shorter than `min_chars` characters."""
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) >= min_chars]


@dataclass
class TokenBatch:
    """A batch of sentences as ids.

    input_ids, attention_mask: `[B, T]` right-padded; `counted` `[B, T]` bool marks the positions an
    analysis may use (real tokens that are not special tokens such as BOS); `sequence_ids` `[B]` number
    the sentences in corpus order, from 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    counted: torch.Tensor
    sequence_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.counted.sum())


def token_batches(
    lm: LM,
    source: str,
    max_tokens: int,
    max_length: int = 64,
    batch_size: int = 16,
    bucket: int = 32,
    seed: int = 0,
    batch_tokens: int | None = None,
) -> Iterator[tuple[TokenBatch, list[list[int]]]]:
    """Yield (batch, the batch's token id lists) until `max_tokens` counted tokens have been read.

    Each sentence is cut to `max_length` tokens. A batch holds at most `batch_size` sentences and, if
    `batch_tokens` is given, at most that many tokens with padding (but always one sentence). Sentences are
    grouped by length within a window of `bucket × batch_size` sentences so that little padding is computed;
    sequence ids still follow corpus order.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    if batch_size < 1 or (batch_tokens is not None and batch_tokens < 1):
        raise ValueError(f"batch_size and batch_tokens must be positive, got {batch_size} and {batch_tokens}")
    tok = lm.tokenizer
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    special_set = set(special.tolist())
    pending: list[tuple[int, list[int]]] = []
    next_id, counted_total = 0, 0

    def flush(rows: list[tuple[int, list[int]]]) -> Iterator[tuple[TokenBatch, list[list[int]]]]:
        chunk: list[tuple[int, list[int]]] = []
        for row in sorted(rows, key=lambda r: len(r[1])):  # longest last, so len(row) is the padded width
            if chunk and (
                len(chunk) == batch_size or (batch_tokens is not None and (len(chunk) + 1) * len(row[1]) > batch_tokens)
            ):
                yield _collate(chunk, tok.pad_token_id, special), [ids for _, ids in chunk]
                chunk = []
            chunk.append(row)
        if chunk:
            yield _collate(chunk, tok.pad_token_id, special), [ids for _, ids in chunk]

    for text in corpus_texts(lm, source, seed=seed):
        for sentence in sentences(text):
            ids = tok(sentence)["input_ids"][:max_length]
            n = sum(1 for t in ids if t not in special_set)
            if n < 1:
                continue
            take = min(n, max_tokens - counted_total)
            if take < n:  # the last sentence: keep just enough tokens
                ids = _cut_to_counted(ids, take, special_set)
            pending.append((next_id, ids))
            next_id += 1
            counted_total += take
            if counted_total >= max_tokens:
                yield from flush(pending)
                return
            if len(pending) >= batch_size * bucket:
                yield from flush(pending)
                pending = []
    if pending:
        yield from flush(pending)


def _cut_to_counted(ids: list[int], keep: int, special: set[int]) -> list[int]:
    out, seen = [], 0
    for t in ids:
        if seen == keep and t not in special:
            break
        out.append(t)
        seen += t not in special
    return out


def _collate(rows: list[tuple[int, list[int]]], pad_id: int, special: torch.Tensor) -> TokenBatch:
    width = max(len(ids) for _, ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (_, ids) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    counted = mask.bool() & ~torch.isin(input_ids, special)
    return TokenBatch(input_ids, mask, counted, torch.tensor([sid for sid, _ in rows]))
