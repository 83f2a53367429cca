"""What a statistics pass will cost, said before it starts: the first closed-form edit on a model computes
key second moments (and, with `source="self"`, first samples the text they are read from), which takes minutes
on a CPU. The estimate comes from timing one forward pass of the pass's own shape and one sampling step."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..models.lm import LM, cache_keyword, returned_cache
from .self_corpus import cached_self_tokens

#: tokens per row of the pilot forward pass (the real rows are longer; attention is a small share here)
PILOT_LEN = 64
#: rows sampled at once (as `self_token_rows` samples them)
SAMPLE_ROWS = 64


@torch.no_grad()
def _seconds_per_token(lm: LM, rows: int, length: int, decode: bool) -> float:
    """Seconds per token of one forward of `[rows, length]` ids, or with `decode` of one cached step after it."""
    ids = torch.arange(rows * length, device=lm.device).remainder(lm.tokenizer.vocab_size or 1000)
    ids = ids.reshape(rows, length)
    start = time.perf_counter()
    if not decode:
        lm.model(input_ids=ids)
        return (time.perf_counter() - start) / (rows * length)
    out = lm.model(input_ids=ids, use_cache=True)
    start = time.perf_counter()
    lm.model(input_ids=ids[:, -1:], **cache_keyword(lm.model, returned_cache(out)), use_cache=True)
    return (time.perf_counter() - start) / rows


def statistics_notice(
    lm: LM, layers: Sequence[int], source: str, n_tokens: int, kind: str, seq_len: int, batch_size: int
) -> str:
    """One paragraph: which statistics are missing, roughly how long they take here, that they are cached, and
    how to prepare them ahead with `kvedit stats`."""
    seconds = n_tokens * _seconds_per_token(lm, batch_size, min(PILOT_LEN, seq_len), decode=False)
    what = f"{n_tokens:,} tokens of {source}"
    if source == "self":
        missing = max(0, n_tokens - cached_self_tokens(lm, seq_len))
        what = f"{n_tokens:,} tokens of text the model samples itself"
        if missing:
            seconds += missing * _seconds_per_token(lm, SAMPLE_ROWS, 8, decode=True)
            what += f" ({missing:,} of them to sample first)"
    layer_list = ",".join(map(str, layers))
    minutes = max(0.5, round(seconds / 30) / 2)
    return (
        f"kvedit: key statistics E[kkᵀ] ({kind}) for layers {layer_list} are not cached yet: reading {what}, "
        f"about {minutes:g} min on this machine. They are computed once and cached for every later edit with "
        f"these settings; `kvedit stats --layers {layer_list} --source {source} --tokens {n_tokens}"
        f"{'' if kind == 'values' else ' --kind ' + kind}` prepares them ahead."
    )
