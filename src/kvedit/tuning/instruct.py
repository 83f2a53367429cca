"""Instruction tuning data (Alpaca format and prompt) and zero-shot MMLU accuracy from the A/B/C/D logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation.comparison import bootstrap_ci
from ..models.lm import LM
from .records import read_records
from .tasks import Example, TaskDataError
from .tokens import encode_prompt

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHOICES = ("A", "B", "C", "D")


def alpaca_prompt(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt for one record (the `input` variant when the record has a non-empty input)."""
    if str(record.get("input") or "").strip():
        return ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def load_alpaca(path: str | Path, n: int) -> list[Example]:
    """The first `n` clean records (non-empty instruction and output) of an Alpaca-format JSON/JSONL file."""
    records = read_records(path)
    out = []
    for i, r in enumerate(records):
        if not isinstance(r.get("instruction"), str) or not str(r.get("output") or "").strip():
            continue
        if not r["instruction"].strip():
            continue
        out.append(Example("alpaca", f"alpaca:{i}", alpaca_prompt(r), str(r["output"])))
        if len(out) == n:
            break
    if not out:
        raise TaskDataError(f"{path}: no Alpaca records (expected objects with instruction, input, output)")
    return out


@dataclass(frozen=True)
class MMLUItem:
    uid: str
    subject: str
    prompt: str  # ends with "Answer:"
    answer: str  # A-D


def load_mmlu(path: str | Path, n: int | None = None) -> list[MMLUItem]:
    """Zero-shot MMLU records `subject, input, output` (qlora's format). With `n`, `n` records taken
    round-robin over subjects (the first of each subject, then the second, …), so every subject counts."""
    records = read_records(path)
    items = [
        MMLUItem(f"mmlu:{i}", str(r["subject"]), str(r["input"]), str(r["output"]).strip())
        for i, r in enumerate(records)
        if r.get("input") and str(r.get("output", "")).strip() in CHOICES
    ]
    if not items:
        raise TaskDataError(f"{path}: no MMLU records (expected JSON lines with subject, input, output A-D)")
    if n is None or n >= len(items):
        return items
    by_subject: dict[str, list[MMLUItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    picked: list[MMLUItem] = []
    depth = 0
    while len(picked) < n:
        for subject_items in by_subject.values():
            if depth < len(subject_items) and len(picked) < n:
                picked.append(subject_items[depth])
        depth += 1
    return sorted(picked, key=lambda it: int(it.uid.split(":")[1]))


def choice_token_ids(lm: LM) -> list[int]:
    """The token of " A" … " D" (the natural continuation of "Answer:"), one id each."""
    ids = [lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in CHOICES]
    if len(set(ids)) != 4:
        raise ValueError("the tokenizer does not give the four answer letters distinct tokens")
    return ids


@torch.no_grad()
def mmlu_predictions(lm: LM, items: Sequence[MMLUItem], batch_size: int = 8, desc: str = "mmlu") -> list[dict]:
    """Per item: the letter with the highest logit at the answer position among A–D, and whether it is right."""
    letters = choice_token_ids(lm)
    tok = lm.tokenizer
    was_training = lm.model.training
    lm.model.eval()
    out = []
    order = sorted(items, key=lambda it: len(it.prompt))  # similar lengths per batch: little padding
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            batch = order[s : s + batch_size]
            rows = [encode_prompt(tok, it.prompt) for it in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            hidden = lm.model.base_model(
                input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False
            ).last_hidden_state
            last = hidden[torch.arange(len(rows)), mask.sum(1).to(lm.device) - 1]
            logits = lm.unembed(last).float()[:, letters].cpu()
            for it, row in zip(batch, logits):
                guess = CHOICES[int(row.argmax())]
                out.append(
                    {
                        "uid": it.uid,
                        "subject": it.subject,
                        "gold": it.answer,
                        "predicted": guess,
                        "correct": int(guess == it.answer),
                    }
                )
    finally:
        lm.model.train(was_training)
    position = {it.uid: i for i, it in enumerate(items)}
    return sorted(out, key=lambda r: position[r["uid"]])


def macro_accuracy(records: Sequence[Mapping[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """MMLU accuracy macro-averaged over subjects (× 100) with a bootstrap interval over questions, and the
    plain (micro) accuracy."""
    subjects = np.array([r["subject"] for r in records])
    correct = np.array([r["correct"] for r in records], dtype=float)
    names = sorted(set(subjects.tolist()))
    codes = np.array([names.index(s) for s in subjects])

    def macro(idx: np.ndarray) -> float:
        sums = np.bincount(codes[idx], weights=correct[idx], minlength=len(names))
        counts = np.bincount(codes[idx], minlength=len(names))
        seen = counts > 0
        return float(100 * (sums[seen] / counts[seen]).mean())

    all_idx = np.arange(len(records))
    ci = bootstrap_ci(macro, len(records), level=level)
    return {
        "mean": macro(all_idx) if len(records) else None,
        "ci": list(ci) if ci else None,
        "count": len(records),
        "subjects": len(names),
        "micro": float(100 * correct.mean()) if len(records) else None,
    }
