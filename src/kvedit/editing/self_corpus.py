"""Text the model samples itself (`source="self"`): statistics without a data set, sampled once and cached.

Rows are sampled in blocks of `block_rows` sequences; block b is seeded by (seed, b) alone, so the first N
tokens are the same whether they come from the cache or are sampled now, and a larger request only
samples the blocks it lacks. The cache holds the token ids and the mask of valid tokens (a row that
samples end-of-text stops there), keyed by the model's unedited fingerprint, the seed and the row length,
with a SHA-256 over the payload; the decoded text is written beside it for people to read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..models.cache import cache_dir, write_atomic
from ..models.lm import LM, cache_keyword, returned_cache

#: openings of the sampled rows, cycled
SELF_SEEDS = (
    "The",
    "In",
    "A",
    "It",
    "This",
    "When",
    "After",
    "Many",
    "One",
    "There",
    "He",
    "She",
    "According to",
    "During",
    "Although",
    "Most",
    "Some",
    "Since",
    "While",
    "However",
)


def _cache_path(lm: LM, seed: int, seq_len: int, block_rows: int) -> Path:
    return cache_dir() / "self-corpus" / lm.base_fingerprint / f"seed{seed}-len{seq_len}-b{block_rows}.safetensors"


def _digest(ids: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha256(ids.contiguous().numpy().tobytes())
    h.update(mask.contiguous().numpy().tobytes())
    return h.hexdigest()


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached (ids, mask), or None if missing or damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids, mask = f.get_tensor("ids"), f.get_tensor("mask")
    except Exception:
        return None
    if ids.shape != mask.shape or meta.get("sha256") != _digest(ids, mask):
        return None
    return ids, mask


def _save(lm: LM, path: Path, ids: torch.Tensor, mask: torch.Tensor) -> None:
    write_atomic(
        path,
        lambda tmp: save_file(
            {"ids": ids.contiguous(), "mask": mask.contiguous()}, str(tmp), metadata={"sha256": _digest(ids, mask)}
        ),
    )
    texts = lm.tokenizer.batch_decode([row[m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
    path.with_suffix(".txt").write_text("\n\n".join(t.replace("\n", " ") for t in texts) + "\n")


def cached_self_tokens(lm: LM, seq_len: int = 256, seed: int = 0, block_rows: int = 64) -> int:
    """How many valid tokens of `lm`'s own text the cache holds for these settings (0 if none)."""
    cached = _load(_cache_path(lm, seed, seq_len, block_rows))
    return 0 if cached is None else int(cached[1].sum())


@torch.no_grad()
def sample_block(
    lm: LM, block: int, seed: int, rows: int, seq_len: int, top_k: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `block`: `rows` sequences of `seq_len` tokens, top-k sampling with a generator seeded by
    (seed, block), one cached forward per new token. Every row opens with the first token(s) of an opening
    word, cut to a common length so no row is padded (padding sends attention down a path ≈ 2.5× slower
    here); end-of-text is never sampled, so every row is full. The global RNG is not touched.
    Returns ids and mask, `[rows, seq_len]` (the mask is all ones: every token is real)."""
    tok = lm.tokenizer
    openings = [tok(SELF_SEEDS[(block * rows + i) % len(SELF_SEEDS)])["input_ids"] for i in range(rows)]
    width = min(map(len, openings))
    ids = torch.tensor([o[:width] for o in openings], device=lm.device)
    generator = torch.Generator(device=lm.device).manual_seed(seed * 1_000_003 + block)
    banned = [t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None]
    out = lm.model(input_ids=ids, use_cache=True)
    while ids.shape[1] < seq_len:
        logits = out.logits[:, -1].float()
        logits[:, banned] = float("-inf")
        top = logits.topk(top_k, dim=-1)
        nxt = top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=generator))
        ids = torch.cat([ids, nxt], 1)
        out = lm.model(input_ids=nxt, **cache_keyword(lm.model, returned_cache(out)), use_cache=True)
    ids = ids[:, :seq_len].cpu()
    return ids, torch.ones_like(ids)


def self_token_rows(
    lm: LM,
    n_tokens: int,
    seq_len: int = 256,
    seed: int = 0,
    block_rows: int = 64,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """At least `n_tokens` valid tokens of model-sampled text as rows: (ids, mask), each `[rows, seq_len]`.

    Reads what the cache holds for (model, seed, seq_len) and samples only the blocks it lacks.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    path = _cache_path(lm, seed, seq_len, block_rows)
    cached = _load(path) if use_cache else None
    ids, mask = (
        cached
        if cached is not None
        else (torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long))
    )
    have = int(mask.sum())
    if have < n_tokens:
        bar = tqdm(
            total=n_tokens,
            initial=have,
            unit="tok",
            unit_scale=True,
            disable=not progress,
            desc="sampling the model's own text (cached afterwards)",
        )
        blocks_ids, blocks_mask = [ids], [mask]
        block = ids.shape[0] // block_rows
        while have < n_tokens:
            b_ids, b_mask = sample_block(lm, block, seed, block_rows, seq_len)
            blocks_ids.append(b_ids)
            blocks_mask.append(b_mask)
            have += int(b_mask.sum())
            bar.update(int(b_mask.sum()))
            block += 1
        bar.close()
        ids, mask = torch.cat(blocks_ids), torch.cat(blocks_mask)
        if use_cache:
            _save(lm, path, ids, mask)
    # the fewest leading rows that hold n_tokens
    rows = int(torch.searchsorted(mask.sum(1).cumsum(0), torch.tensor(n_tokens)).item()) + 1
    return ids[:rows], mask[:rows]
