"""Trigger examples of FFN keys (Geva et al. 2021): for every memory, the corpus prefixes that excite it most.

A prefix is a sentence cut after some token; its score for memory i is the memory coefficient `m_i` at the
prefix's last token (the input of the values module: `f(h·k_i)`, or `act(h·k_gate,i)·(h·k_up,i)` in gated
FFNs). All requested layers are mined in one forward pass per batch, which stops after the last requested layer
(no logits); each layer's coefficients are merged into a running top-k per memory on the device as the pass
reaches them (`topk.RunningTopK`), so memory is `k × d_ff` per layer whatever the corpus size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from inspect import signature
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..models.compute import compute_view
from ..models.ffn_width import ffn_width
from ..models.lm import LM
from .corpus import TokenBatch, token_batches
from .topk import Rank, RunningTopK

TRIGGERS_FILE = "triggers.safetensors"


def coefficient_note(lm: LM) -> str:
    """What the mined score is, in words, for this model's FFN."""
    act = lm.arch.activation(lm.model.config)
    if lm.arch.gated:
        return f"coefficient = {act}(h·k_gate)·(h·k_up), the input of the values module (gated FFN)"
    return f"coefficient = {act}(h·k), the input of the values module"


@dataclass(frozen=True)
class TriggerExample:
    """One top prefix of a memory: `ids` are the sentence's tokens up to and including the trigger token
    (`ids[-1]`, at `position`); `next_id` is the token that follows it in the corpus (None at the end)."""

    coefficient: float
    sequence: int
    position: int
    ids: tuple[int, ...]
    next_id: int | None


@dataclass
class TriggerSet:
    """Mined trigger examples: per layer `coefficients` and `codes` `[d_ff, k]` (best first), and the token
    ids of every sentence they point into (`sequences`, by sequence number)."""

    layers: list[int]
    coefficients: dict[int, torch.Tensor]
    codes: dict[int, torch.Tensor]
    sequences: dict[int, tuple[int, ...]]
    stride: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return next(iter(self.codes.values())).shape[1]

    def _check(self, layer: int) -> None:
        if layer not in self.codes:
            raise ValueError(f"layer {layer} was not mined; mined layers are {self.layers}")

    def examples(self, layer: int, key: int, n: int | None = None) -> list[TriggerExample]:
        """The top `n` (default all k) trigger examples of memory `key` in `layer`, best first."""
        self._check(layer)
        d_ff = self.codes[layer].shape[0]
        if not 0 <= key < d_ff:
            raise ValueError(f"key {key} is out of range; layer {layer} has memories 0..{d_ff - 1}")
        out = []
        for coef, code in zip(self.coefficients[layer][key, :n].tolist(), self.codes[layer][key, :n].tolist()):
            if code < 0:
                break
            seq, pos = divmod(code, self.stride)
            ids = self.sequences[seq]
            out.append(TriggerExample(coef, seq, pos, ids[: pos + 1], ids[pos + 1] if pos + 1 < len(ids) else None))
        return out

    def token_table(self, layer: int, offset: int) -> torch.Tensor:
        """Token id at `position + offset` of every example (0: the trigger token, 1: the next token),
        `[d_ff, k]` long, -1 where there is none."""
        self._check(layer)
        codes = self.codes[layer]
        width = max((len(s) for s in self.sequences.values()), default=0) + 1
        table = torch.full((len(self.sequences) + 1, width), -1, dtype=torch.long)
        row_of = {seq: i for i, seq in enumerate(self.sequences)}
        for seq, ids in self.sequences.items():
            table[row_of[seq], : len(ids)] = torch.tensor(ids, dtype=torch.long)
        seqs, pos = codes.cpu() // self.stride, codes.cpu() % self.stride + offset  # [d_ff, k] each
        rows = torch.tensor([row_of.get(s, len(self.sequences)) for s in seqs.reshape(-1).tolist()]).view_as(seqs)
        out = table[rows, pos.clamp(max=width - 1)]
        return torch.where(codes.cpu() < 0, torch.full_like(out, -1), out)

    # ---- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write `triggers.safetensors` (tensors + settings) and `meta.json` (the settings) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        seq_ids = sorted(self.sequences)
        lengths = [len(self.sequences[s]) for s in seq_ids]
        tensors = {
            "sequence_ids": torch.tensor(seq_ids, dtype=torch.long),
            "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
            "sequence_tokens": torch.tensor([t for s in seq_ids for t in self.sequences[s]], dtype=torch.long),
        }
        for layer in self.layers:
            tensors[f"coefficients.{layer}"] = self.coefficients[layer].cpu().contiguous()
            tensors[f"codes.{layer}"] = self.codes[layer].cpu().contiguous()
        meta = self.meta | {"layers": self.layers, "stride": self.stride}
        tmp = folder / f".{TRIGGERS_FILE}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "kvedit-triggers", "meta": json.dumps(meta)})
        tmp.replace(folder / TRIGGERS_FILE)
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder / TRIGGERS_FILE

    @classmethod
    def load(cls, folder: str | Path) -> "TriggerSet":
        path = Path(folder) / TRIGGERS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no mined triggers ({TRIGGERS_FILE}); run `kvedit analyze "
                f"triggers --out {folder}` first"
            )
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != "kvedit-triggers":
                raise ValueError(f"{path} is not a kvedit triggers file")
            meta = json.loads(header["meta"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        tokens, sequences, start = t["sequence_tokens"].tolist(), {}, 0
        for seq, length in zip(t["sequence_ids"].tolist(), t["sequence_lengths"].tolist()):
            sequences[seq] = tuple(tokens[start : start + length])
            start += length
        layers = [int(l) for l in meta["layers"]]
        return cls(
            layers,
            {l: t[f"coefficients.{l}"] for l in layers},
            {l: t[f"codes.{l}"] for l in layers},
            sequences,
            int(meta["stride"]),
            meta,
        )


class _StopForward(Exception):
    """Raised by the last mined layer's hook: nothing after it (later layers, logits) is needed."""


class TriggerMiner:
    """Streaming trigger mining: `add` one batch of `token_batches` at a time, then `result`.

    During `add`, forward pre-hooks on the values modules of `layers` merge the batch's coefficients (the values
    module's input, `[B, T, d_ff]`, or `[B·T, d_ff]` in families that flatten tokens) into each layer's running
    top-k as the forward reaches it, so only one layer's coefficients are alive at a time; the last layer's hook
    ends the forward before its values module (no later layer, no logits). Between calls the model is unhooked.
    The passes run in `lm.compute_dtype` (a bfloat16 copy of the weights as they were when the miner was made);
    coefficients are ranked and stored in float32.
    """

    def __init__(
        self, lm: LM, layers: Sequence[int] | None = None, k: int = 50, rank: Rank = "value", stride: int = 64
    ) -> None:
        self.layers = sorted({lm.check_layer(l) for l in (range(lm.num_layers) if layers is None else layers)})
        if not self.layers:
            raise ValueError("layers is empty; give at least one layer")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if rank not in ("value", "abs"):
            raise ValueError(f"rank must be 'value' or 'abs', got {rank!r}")
        self.lm, self.k, self.rank, self.stride = lm, k, rank, stride
        self.view = compute_view(lm)  # lm itself in float32
        d_ff = {l: ffn_width(lm, l) for l in self.layers}
        self.tops = {l: RunningTopK.empty(d_ff[l], k, lm.device) for l in self.layers}
        self.sequences: dict[int, tuple[int, ...]] = {}
        self.tokens = 0
        self._prune_at = 4096
        self._extra = {"use_cache": False} if "use_cache" in signature(lm.model.forward).parameters else {}

    def _hook(
        self, layer: int, codes: torch.Tensor, valid: torch.Tensor, module: torch.nn.Module, args: tuple[Any, ...]
    ) -> None:
        coefficients = args[0].float()
        self.tops[layer].update(coefficients.reshape(-1, coefficients.shape[-1]), codes, self.rank, valid)
        if layer == self.layers[-1]:
            raise _StopForward

    @torch.inference_mode()
    def add(self, batch: TokenBatch, ids: Sequence[Sequence[int]]) -> None:
        """One forward pass over `batch` (its sentences' token ids `ids`), up to the last layer's coefficients."""
        if batch.input_ids.shape[1] > self.stride:
            raise ValueError(f"batch rows of {batch.input_ids.shape[1]} tokens exceed the stride {self.stride}")
        device = self.lm.device
        positions = torch.arange(batch.input_ids.shape[1])
        codes = (batch.sequence_ids[:, None] * self.stride + positions).reshape(-1).to(device)
        valid = batch.counted.reshape(-1).to(device)
        handles = [
            self.view.module(self.view.values_path(l)).register_forward_pre_hook(partial(self._hook, l, codes, valid))
            for l in self.layers
        ]
        try:
            self.view.model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), **self._extra
            )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        self.sequences.update(zip(batch.sequence_ids.tolist(), map(tuple, ids)))
        if len(self.sequences) > self._prune_at:  # keep only the sentences some top-k entry points into
            self.sequences = _referenced(self.sequences, self.tops, self.stride)
            self._prune_at = 2 * len(self.sequences) + 4096
        self.tokens += batch.num_tokens

    def result(self, meta: dict[str, Any] | None = None) -> TriggerSet:
        """The mined triggers so far (tensors on the CPU), with `meta` added to the settings."""
        meta = {
            "model": self.lm.name,
            "model_fingerprint": self.lm.base_fingerprint,
            "tokens": self.tokens,
            "k": self.k,
            "rank": self.rank,
            "max_length": self.stride,
            "coefficient": coefficient_note(self.lm),
            "compute_dtype": self.lm.compute_dtype,
        } | (meta or {})
        return TriggerSet(
            self.layers,
            {l: self.tops[l].coefficients.cpu() for l in self.layers},
            {l: self.tops[l].codes.cpu() for l in self.layers},
            _referenced(self.sequences, self.tops, self.stride),
            self.stride,
            meta,
        )


def mine_triggers(
    lm: LM,
    source: str,
    layers: Sequence[int] | None = None,
    k: int = 50,
    max_tokens: int = 100_000,
    max_length: int = 64,
    batch_size: int = 512,
    rank: Rank = "value",
    progress: bool = True,
    seed: int = 0,
    batch_tokens: int | None = 2048,
) -> TriggerSet:
    """The top-`k` prefixes of every memory of `layers` (default all) over `max_tokens` corpus tokens.

    source: a text file, a folder of .txt files, `hf:<dataset>` or `self` (see `analysis.corpus`).
    rank: "value" ranks by the signed coefficient (largest first; what ReLU keys detect), "abs" by |m|
        (gated FFNs also write strongly with negative coefficients). Coefficients are stored signed.
    batch_size, batch_tokens: sentences, and padded tokens (None: no limit), per forward pass at most. Matrix
        products on a CPU run faster over a few thousand tokens than over a few hundred.
    Equal scores (e.g. the same first token in many sentences) go to the earlier place in the corpus.
    """
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    max_length = min(max_length, limit) if limit else max_length
    miner = TriggerMiner(lm, layers, k, rank, max_length)
    bar = tqdm(
        total=max_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"mining triggers ({len(miner.layers)} layers)",
        disable=not progress,
    )
    with bar:
        for batch, ids in token_batches(
            lm, source, max_tokens, max_length, batch_size, seed=seed, batch_tokens=batch_tokens
        ):
            miner.add(batch, ids)
            bar.update(batch.num_tokens)
    if not miner.sequences:
        raise ValueError(f"corpus source {source!r} gave no text")
    return miner.result({"source": str(source), "max_tokens": max_tokens})


def _referenced(sequences: dict[int, tuple[int, ...]], tops: dict[int, RunningTopK], stride: int):
    """Only the sentences some running top-k still points into (bounds the memory of long runs)."""
    used = torch.unique(torch.cat([t.codes.reshape(-1) for t in tops.values()]))
    keep = set((used[used >= 0] // stride).tolist())
    return {s: ids for s, ids in sequences.items() if s in keep}


def load_or_mine(folder: str | Path, lm: LM, layers: Sequence[int] | None = None, **mine_kwargs: Any) -> TriggerSet:
    """The triggers mined into `folder` if they are for this model and cover `layers`; else mine and save them."""
    folder = Path(folder)
    wanted = sorted({lm.check_layer(l) for l in (range(lm.num_layers) if layers is None else layers)})
    if (folder / TRIGGERS_FILE).is_file():
        found = TriggerSet.load(folder)
        check_for_model(found, lm, folder)
        if set(wanted) <= set(found.layers):
            return found
    found = mine_triggers(lm, layers=wanted, **mine_kwargs)
    found.save(folder)
    return found


def check_for_model(triggers: TriggerSet, lm: LM, folder: str | Path) -> None:
    """Refuse triggers mined on another model (their coefficients would mean nothing here)."""
    if triggers.meta.get("model_fingerprint") != lm.base_fingerprint:
        raise ValueError(
            f"the triggers in {folder} were mined on {triggers.meta.get('model')!r} (fingerprint "
            f"{triggers.meta.get('model_fingerprint')}), not on this model ({lm.name}, fingerprint "
            f"{lm.base_fingerprint}); mine again into another folder"
        )
