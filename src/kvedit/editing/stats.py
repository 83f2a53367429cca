"""Second moments E[k kᵀ] of the keys a module reads, over a text corpus, cached on disk.

`k` is the input of the values module (the memory coefficients, `[d_ff]`) or of the attention
output projection. All requested layers are collected in one pass per batch, and the forward
pass stops after the last layer needed. Sums are kept in float64; each batch's `KᵀK` is formed
in the model's dtype and added to the float64 sum.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..models.devices import float64_device
from ..models.lm import LM, tensor_attr
from ..models.cache import cache_dir, write_atomic
from ..models.tracing import Trace
from .self_corpus import sample_block, self_token_rows
from .stats_notice import statistics_notice

#: which module input a statistic is taken from -> Trace site kind
STAT_SITES: Mapping[str, str] = MappingProxyType({"values": "coefficients", "attn_out": "attn_heads"})


@dataclass
class KeyStats:
    """Running uncentred second moment of keys: `sum_kkT` `[d, d]` float64 over `count` tokens."""

    sum_kkT: torch.Tensor
    count: int

    @classmethod
    def zeros(cls, dim: int) -> "KeyStats":
        return cls(torch.zeros(dim, dim, dtype=torch.float64), 0)

    def add(self, keys: torch.Tensor) -> None:
        """Accumulate `keys` `[n, d]`."""
        self.sum_kkT += (keys.T @ keys).double()
        self.count += keys.shape[0]

    def merge(self, other: "KeyStats") -> "KeyStats":
        return KeyStats(self.sum_kkT + other.sum_kkT, self.count + other.count)

    @property
    def mom2(self) -> torch.Tensor:
        """E[k kᵀ], `[d, d]` float64."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.sum_kkT / self.count


def corpus_texts(lm: LM, source: str, seed: int = 0) -> Iterator[str]:
    """Texts from `source`: a text file, a folder of .txt files, `hf:<dataset>[:<config>]`, or `self`.

    `self` samples text from the model itself (seeded), so statistics need no data set.
    """
    if source == "self":
        yield from _self_texts(lm, seed)
        return
    if source.startswith("hf:"):
        yield from _hf_texts(source[3:])
        return
    path = Path(source).expanduser()
    files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(
            f"corpus source {source!r} is not a text file, a folder of .txt files, 'self' or 'hf:<dataset>'"
        )
    for file in files:
        paragraph: list[str] = []
        for line in file.open(encoding="utf-8", errors="replace"):
            if line.strip() and not line.strip().startswith("= "):
                paragraph.append(line.strip())
            elif paragraph:
                yield " ".join(paragraph)
                paragraph = []
        if paragraph:
            yield " ".join(paragraph)


def _hf_texts(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("hf: corpus sources need `pip install datasets` and a reachable hub") from err
    dataset, _, config = name.partition(":")
    presets = {"wikitext-103": ("wikitext", "wikitext-103-raw-v1"), "wikipedia": ("wikimedia/wikipedia", "20231101.en")}
    dataset, default_config = presets.get(dataset, (dataset, None))
    for row in datasets.load_dataset(dataset, config or default_config, split="train", streaming=True):
        if row.get("text", "").strip():
            yield row["text"]


def _self_texts(lm: LM, seed: int, block_rows: int = 64, seq_len: int = 256) -> Iterator[str]:
    """Model-sampled texts, block after block, as `self_token_rows` samples them (not cached)."""
    for block in itertools.count():
        ids, mask = sample_block(lm, block, seed, block_rows, seq_len)
        yield from lm.tokenizer.batch_decode([r[m.bool()] for r, m in zip(ids, mask)], skip_special_tokens=True)


def source_slug(source: str) -> str:
    tail = Path(source).name if not source.startswith("hf:") and source != "self" else source
    digest = hashlib.sha1(source.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:40] + "-" + digest


def _cache_path(lm: LM, kind: str, layer: int, source: str, n_tokens: int) -> Path:
    return cache_dir() / "stats" / lm.base_fingerprint / f"{kind}-L{layer}-{source_slug(source)}-{n_tokens}.safetensors"


def _cache_meta(lm: LM, kind: str, layer: int, source: str, n_tokens: int) -> dict[str, str]:
    return {
        "model": lm.base_fingerprint,
        "kind": kind,
        "layer": str(layer),
        "source": source,
        "n_tokens": str(n_tokens),
    }


def _payload_digest(sum_kkT: torch.Tensor, meta: dict[str, str]) -> str:
    """SHA-256 over the whole payload: the tensor's bytes and every metadata field (count included)."""
    h = hashlib.sha256(sum_kkT.contiguous().numpy().tobytes())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def _load_cached(path: Path, expect: dict[str, str]) -> KeyStats | None:
    """The cached statistic, or None if missing, unreadable, for other settings, or damaged in any field."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensor = f.get_tensor("sum_kkT")
    except Exception:
        return None
    if any(meta.get(k) != v for k, v in expect.items()):
        return None
    if meta.get("sha256") != _payload_digest(tensor, meta):
        return None
    count = meta.get("count", "")
    if not count.isdigit() or int(count) <= 0 or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        return None
    return KeyStats(tensor, int(count))


def _save_cached(path: Path, stats: KeyStats, meta: dict[str, str]) -> None:
    meta = meta | {"count": str(stats.count)}
    write_atomic(
        path,
        lambda tmp: save_file(
            {"sum_kkT": stats.sum_kkT.contiguous()},
            str(tmp),
            metadata=meta | {"sha256": _payload_digest(stats.sum_kkT, meta)},
        ),
    )


def key_statistics(
    lm: LM,
    layers: Sequence[int],
    source: str = "self",
    n_tokens: int = 100_000,
    kind: str = "values",
    seq_len: int = 256,
    batch_size: int = 8,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, KeyStats]:
    """E[k kᵀ] of the `kind` module's input ("values" or "attn_out") at every layer in `layers`.

    Reads `n_tokens` tokens of `source` (sequences of at most `seq_len` tokens), all layers in one
    pass per batch. Results are cached per model (its unedited fingerprint), layer, source and
    token count; a cache file that is corrupt or was made with other settings is recomputed.
    """
    if kind not in STAT_SITES:
        raise ValueError(f"kind must be one of {sorted(STAT_SITES)}, got {kind!r}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    layers = sorted({lm.check_layer(l) for l in layers})
    result: dict[int, KeyStats] = {}
    if use_cache:
        for layer in layers:
            memo_key = ("key_statistics", kind, layer, source, n_tokens)
            cached = lm.memo.get(memo_key) or _load_cached(
                _cache_path(lm, kind, layer, source, n_tokens), _cache_meta(lm, kind, layer, source, n_tokens)
            )
            if cached is not None:
                result[layer] = lm.memo[memo_key] = cached
    todo = [l for l in layers if l not in result]
    if not todo:
        return result
    seq_len = min(seq_len, getattr(lm.model.config, "max_position_embeddings", seq_len) or seq_len)
    if progress:
        tqdm.write(statistics_notice(lm, todo, source, n_tokens, kind, seq_len, batch_size), file=sys.stderr)
    fresh = _accumulate(lm, todo, source, n_tokens, kind, seq_len, batch_size, progress)
    lm.memo["key_statistics_computed"] = lm.memo.get("key_statistics_computed", 0) + len(fresh)
    for layer, stats in fresh.items():
        if use_cache:
            _save_cached(
                _cache_path(lm, kind, layer, source, n_tokens), stats, _cache_meta(lm, kind, layer, source, n_tokens)
            )
            lm.memo[("key_statistics", kind, layer, source, n_tokens)] = stats
        result[layer] = stats
    return result


def statistics_batches(
    lm: LM, source: str, n_tokens: int, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (ids, attention mask), `[b, ≤seq_len]`, of consecutive corpus text, `n_tokens` tokens in all."""
    if source == "self":
        yield from _self_batches(lm, n_tokens, seq_len, batch_size)
        return
    buffer: list[int] = []
    rows: list[list[int]] = []
    left = n_tokens
    eos = lm.tokenizer.eos_token_id
    for text in corpus_texts(lm, source):
        buffer.extend(lm.tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
        while len(buffer) >= seq_len and left > 0:
            take = min(seq_len, left)
            rows.append(buffer[:take])
            buffer, left = buffer[seq_len:], left - take
            if len(rows) == batch_size or left == 0:
                yield _pad(rows, lm.tokenizer.pad_token_id)
                rows = []
        if left == 0:
            return
    if buffer and left > 0:
        rows.append(buffer[:left])
    if rows:
        yield _pad(rows, lm.tokenizer.pad_token_id)


def _self_batches(lm: LM, n_tokens: int, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The model's own cached text (sampled once, see `self_corpus`), cut to exactly `n_tokens` valid tokens."""
    ids, mask = self_token_rows(lm, n_tokens, seq_len)
    mask = mask.clone()
    flat = mask.reshape(-1)
    flat[flat.cumsum(0) > n_tokens] = 0
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start : start + batch_size], mask[start : start + batch_size]


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def _accumulate(lm, layers, source, n_tokens, kind, seq_len, batch_size, progress) -> dict[int, KeyStats]:
    site = STAT_SITES[kind]
    stats: dict[int, KeyStats] = {}
    bar = tqdm(
        total=n_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"key statistics L{','.join(map(str, layers))}",
        disable=not progress,
    )
    start = time.perf_counter()
    for ids, mask in statistics_batches(lm, source, n_tokens, seq_len, batch_size):
        with Trace(lm, read=[(site, l) for l in layers], stop=True) as tr:
            lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
        valid = mask.bool()
        for layer in layers:
            keys = tr[site, layer][valid.to(tr[site, layer].device)].float()
            stats.setdefault(layer, KeyStats.zeros(keys.shape[-1])).add(keys.cpu())
        bar.update(int(valid.sum()))
        bar.set_postfix(tok_per_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()
    return stats


def inverse_mom2(lm: LM, layer: int, source: str, n_tokens: int, kind: str = "values") -> torch.Tensor:
    """C⁻¹ `[d_in, d_in]` float64 for `key_statistics(lm, [layer], source, n_tokens, kind)`, inverted once per
    loaded model and kept in `lm.memo` (edits that reuse a layer never invert C again)."""
    layer = lm.check_layer(layer)
    memo_key = ("inverse_mom2", kind, layer, source, n_tokens)
    if memo_key not in lm.memo:
        mom2 = key_statistics(lm, [layer], source, n_tokens, kind=kind)[layer].mom2
        path = lm.values_path(layer) if kind == "values" else lm.attn_out_path(layer)
        device = float64_device(tensor_attr(lm.module(path), "weight").device)  # invert where the edits use it
        lm.memo[memo_key] = torch.linalg.inv(mom2.to(device, torch.float64))
    return lm.memo[memo_key]
