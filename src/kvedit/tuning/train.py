"""The adapter training loop: deterministic batches, gradient accumulation, checkpoints a killed run resumes from.

Batches are a pure function of (examples, config): the same seed gives the same order whether or not the run
was interrupted. A checkpoint holds the adapter weights, optimiser and schedule state, the torch RNG state
(dropout) and the loss history, so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..models.lm import LM
from .presets import TrainConfig
from .tasks import Example
from .tokens import encode_example


@dataclass(frozen=True)
class TrainRow:
    """One training row: token ids and which positions' *next* tokens carry loss (`[T]` each)."""

    ids: tuple[int, ...]
    loss: tuple[bool, ...]


def training_sequences(lm: LM, examples: Sequence[Example], config: TrainConfig) -> list[TrainRow]:
    """Each example as ids ending in EOS; loss on the label + EOS, or on every token (`loss_on="all"`).
    Packed: examples are concatenated in a seeded order and cut into `max_length` chunks."""
    rows = []
    for e in examples:
        enc = encode_example(lm.tokenizer, e.prompt, e.label, eos=True)
        first = 0 if config.loss_on == "all" else enc.n_prompt
        rows.append((enc.ids, tuple(i >= max(first, 1) for i in range(len(enc.ids)))))
    if not config.packing:
        return [TrainRow(ids[-config.max_length :], loss[-config.max_length :]) for ids, loss in rows]
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    ids = [t for i in order for t in rows[i][0]]
    loss = [m for i in order for m in rows[i][1]]
    L = config.max_length
    return [
        TrainRow(tuple(ids[s : s + L]), (False, *loss[s + 1 : s + L]))
        for s in range(0, len(ids), L)
        if any(loss[s + 1 : s + L])
    ]


def batch_schedule(sequences: Sequence[TrainRow], config: TrainConfig) -> list[list[int]]:
    """Micro-batches (lists of sequence indices) for the whole run, `grad_accum` per optimiser step.

    Each epoch shuffles with seed (seed, epoch); unpacked rows are grouped by length within windows of
    50 batches (padding by length) and the batches shuffled again.
    """
    n, bs = len(sequences), config.batch_size
    per_epoch = math.ceil(n / bs)
    micro_total = (
        config.max_steps * config.grad_accum
        if config.max_steps is not None
        else math.ceil(config.epochs * per_epoch / config.grad_accum) * config.grad_accum
    )
    out: list[list[int]] = []
    epoch = 0
    while len(out) < micro_total:
        rng = random.Random(config.seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        if not config.packing:
            window = 50 * bs
            order = [
                i
                for s in range(0, n, window)
                for i in sorted(order[s : s + window], key=lambda i: len(sequences[i].ids))
            ]
        batches = [order[s : s + bs] for s in range(0, n, bs)]
        rng.shuffle(batches)
        out += batches
        epoch += 1
    return out[:micro_total]


def collate(sequences: Sequence[TrainRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `loss_mask` (`[B, T]`); loss_mask[t] means the token
    at t is a target (predicted from position t − 1)."""
    t = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attn[i, : len(s.ids)] = 1
        loss[i, : len(s.ids)] = torch.tensor(s.loss)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def batch_loss(lm: LM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the batch's target tokens, their count); only target positions are
    unembedded, so a 49k vocabulary costs `[targets, vocab]`, not `[B, T, vocab]`."""
    batch = {k: v.to(lm.device) for k, v in batch.items()}
    hidden = lm.model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["loss_mask"][:, 1:]
    logits = lm.unembed(hidden[:, :-1][targets]).float()
    gold = batch["input_ids"][:, 1:][targets]
    return F.cross_entropy(logits, gold, reduction="sum"), int(targets.sum())


class PeakMemory:
    """Peak resident memory (MB) of this process while the context is open, sampled every 0.1 s
    (CUDA: the allocator's peak)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            import os

            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = self.rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20


def _warmup_then_constant(total_steps: int, warmup_ratio: float):
    warm = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
    return lambda step: min(1.0, (step + 1) / warm) if warm else 1.0


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class TrainState(TypedDict):
    """What a checkpoint records besides the weights: steps done, loss per step, tokens seen, seconds spent."""

    step: int
    losses: list[float]
    tokens: int
    time_s: float


def save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: TrainState) -> None:
    """Write the checkpoint to a temporary folder, then swap it in (a kill never leaves a half-written one)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}, tmp / "adapter.safetensors")
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()},
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> TrainState:
    params = _trainable(model)
    saved = load_file(folder / "adapter.safetensors")
    if set(saved) != set(params):
        raise ValueError(f"checkpoint {folder} does not match this adapter (different targets); delete it to restart")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    extra = torch.load(folder / "optimizer.pt", weights_only=False)
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    state: TrainState = json.loads((folder / "state.json").read_text())
    return state


@dataclass
class TrainResult:
    """Losses per optimiser step (mean per target token), tokens seen and wall time (s) over every session of
    the run; `session_tokens` / `session_time_s` of this call alone (resumed from step `resumed_from`)."""

    losses: list[float]
    tokens: int
    steps: int
    time_s: float
    resumed_from: int
    session_tokens: int
    session_time_s: float
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps

    @property
    def tokens_per_s(self) -> float:
        return self.session_tokens / self.session_time_s if self.session_time_s else float("nan")


def train_adapter(
    lm: LM,
    peft_model: nn.Module,
    examples: Sequence[Example],
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    desc: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train the adapter of `peft_model` (wrapping `lm.model`) on `examples`.

    With `checkpoint_dir`, a checkpoint is written every `config.checkpoint_every` steps and at the end,
    and an existing one is resumed. `stop_after` ends the run after that many steps (a controlled
    "kill", for tests). The model is left in eval mode.
    """
    if not examples:
        raise ValueError("no training examples: the task data is empty")
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left alone
        torch.manual_seed(config.seed)  # dropout; a resumed run restores the killed run's state instead
        return _train(lm, peft_model, examples, config, checkpoint_dir, desc, stop_after)


def _train(
    lm: LM,
    peft_model: nn.Module,
    examples: Sequence[Example],
    config: TrainConfig,
    checkpoint_dir: str | Path | None,
    desc: str,
    stop_after: int | None,
) -> TrainResult:
    sequences = training_sequences(lm, examples, config)
    schedule = batch_schedule(sequences, config)
    total = len(schedule) // config.grad_accum
    params = list(_trainable(peft_model).values())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then_constant(total, config.warmup_ratio))
    ckpt = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir is not None else None
    state: TrainState = {"step": 0, "losses": [], "tokens": 0, "time_s": 0.0}
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, peft_model, opt, sched)
    start = state["step"]
    pad = lm.tokenizer.pad_token_id
    peft_model.train()
    began, tokens_now = time.perf_counter(), 0
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total, unit="step", leave=False)
    try:
        for step in bar:
            micro = [
                collate([sequences[i] for i in idx], pad)
                for idx in schedule[step * config.grad_accum : (step + 1) * config.grad_accum]
            ]
            n_targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro)
            step_loss = 0.0
            for batch in micro:
                loss_sum, _ = batch_loss(lm, batch)
                (loss_sum / max(n_targets, 1)).backward()
                step_loss += float(loss_sum.detach())
                tokens_now += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["losses"].append(step_loss / max(n_targets, 1))
            state["step"] = step + 1
            elapsed = time.perf_counter() - began
            bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", tok_s=f"{tokens_now / elapsed:.0f}")
            done = step + 1 == total or (stop_after is not None and step + 1 >= stop_after)
            if ckpt is not None and ((step + 1) % config.checkpoint_every == 0 or done):
                save_checkpoint(
                    ckpt,
                    peft_model,
                    opt,
                    sched,
                    {**state, "tokens": state["tokens"] + tokens_now, "time_s": state["time_s"] + elapsed},
                )
            if stop_after is not None and step + 1 >= stop_after:
                break
    finally:
        bar.close()
        peft_model.eval()
    elapsed = time.perf_counter() - began
    return TrainResult(
        state["losses"],
        state["tokens"] + tokens_now,
        state["step"],
        state["time_s"] + elapsed,
        start,
        tokens_now,
        elapsed,
        total,
    )
