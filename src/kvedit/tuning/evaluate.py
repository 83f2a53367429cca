"""Classification evaluation: exact match of the greedy continuation (the seed's metric) and, beside it, the
accuracy of ranking the task's label words by likelihood; accuracy and macro-F1 per task.

One forward pass over each batch of prompts fills the KV cache; greedy decoding and the scoring of every label
word continue from it, so evaluation costs about one prompt pass per example.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.lm import LM, cache_keyword, returned_cache
from .tasks import Example
from .tokens import encode_example, encode_prompt


@dataclass(frozen=True)
class Prediction:
    """One test example's outcome: the greedy continuation (stripped) and the label word ranked first."""

    uid: str
    task: str
    gold: str
    generated: str
    ranked: str
    label_logprobs: tuple[float, ...]  # per label word (task order), summed over its tokens (nats)

    @property
    def exact(self) -> bool:
        return self.generated == self.gold

    def record(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "task": self.task,
            "gold": self.gold,
            "generated": self.generated,
            "ranked": self.ranked,
            "exact": int(self.exact),
            "rank_correct": int(self.ranked == self.gold),
            "label_logprobs": list(self.label_logprobs),
        }


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.tensor(r)
        mask[i, t - len(r) :] = 1
    return ids, mask


def _step(
    lm: LM, ids: torch.Tensor, mask: torch.Tensor, cache: Any, last_only: bool = False
) -> tuple[torch.Tensor, Any]:
    """Feed `ids` `[B, t]` after the cached tokens (`mask` covers cache + ids); log-probs `[B, t, vocab]`
    (`[B, 1, vocab]` with `last_only`: only the last position is unembedded)."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    out = lm.model.base_model(
        input_ids=ids.to(lm.device),
        attention_mask=mask.to(lm.device),
        position_ids=positions.to(lm.device),
        **cache_keyword(lm.model.base_model, cache),
        use_cache=True,
    )
    hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
    logits = lm.unembed(hidden).float()
    return F.log_softmax(logits, -1).cpu(), returned_cache(out)


@torch.no_grad()
def predict_batch(lm: LM, examples: Sequence[Example], labels: Sequence[str], max_new_tokens: int) -> list[Prediction]:
    """Greedy continuation (up to EOS or `max_new_tokens`) and label-word log-likelihoods for a batch."""
    tok = lm.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [encode_prompt(tok, e.prompt) for e in examples]
    ids, mask = _left_pad(prompts, pad)
    logp, cache = _step(lm, ids, mask, None, last_only=True)
    last = logp[:, -1]  # [B, vocab]: the next token after each prompt

    # label words: continue a copy of the cache with each word's ids (right-padded, masked)
    scores = torch.zeros(len(examples), len(labels))
    for j, label in enumerate(labels):
        label_ids = [encode_example(tok, e.prompt, label).label_ids for e in examples]
        width = max(len(r) for r in label_ids)
        feed = torch.full((len(examples), width), pad, dtype=torch.long)
        valid = torch.zeros_like(feed, dtype=torch.bool)
        for i, r in enumerate(label_ids):
            feed[i, : len(r)] = torch.tensor(r)
            valid[i, : len(r)] = True
        first = last.gather(1, feed[:, :1])[:, 0]
        total = first
        if width > 1:
            cont, _ = _step(lm, feed[:, :-1], torch.cat([mask, torch.ones_like(feed[:, :-1])], 1), copy.deepcopy(cache))
            rest = cont.gather(2, feed[:, 1:, None])[..., 0] * valid[:, 1:]
            total = total + rest.sum(1)
        scores[:, j] = total

    # greedy decoding from the prompt's cache
    generated: list[list[int]] = [[] for _ in examples]
    finished = torch.zeros(len(examples), dtype=torch.bool)
    nxt = last.argmax(-1)
    for step in range(max_new_tokens):
        for i, t in enumerate(nxt.tolist()):
            if not finished[i]:
                if t == eos:
                    finished[i] = True
                else:
                    generated[i].append(t)
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(len(examples), 1, dtype=mask.dtype)], 1)
        logp, cache = _step(lm, nxt[:, None], mask, cache)
        nxt = logp[:, -1].argmax(-1)

    out = []
    for i, e in enumerate(examples):
        text = str(tok.decode(generated[i], skip_special_tokens=True)).strip()
        out.append(
            Prediction(
                e.uid, e.task, e.label, text, labels[int(scores[i].argmax())], tuple(float(s) for s in scores[i])
            )
        )
    return out


def predict(
    lm: LM,
    examples: Sequence[Example],
    labels: Mapping[str, Sequence[str]],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    desc: str = "evaluate",
) -> list[Prediction]:
    """Predictions for `examples` (any mix of tasks; `labels[task]` are that task's label words).

    `max_new_tokens` defaults to the longest label's token count + 2: a longer continuation cannot equal a
    label once stripped, so decoding further (the seed decodes 20 tokens) cannot change exact match.
    """
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    missing = [t for t in by_task if t not in labels or not labels[t]]
    if missing:
        raise ValueError(f"no label words for task(s) {missing}")
    was_training = lm.model.training
    lm.model.eval()
    out: list[Prediction] = []
    bar = tqdm(total=len(examples), desc=desc, unit="ex", leave=False)
    try:
        for task, items in by_task.items():
            width = max(len(encode_example(lm.tokenizer, items[0].prompt, w).label_ids) for w in labels[task])
            n_new = max_new_tokens if max_new_tokens is not None else width + 2
            # batches of similar prompt length waste little on padding; results go back in input order
            order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
            done: dict[int, Prediction] = {}
            for s in range(0, len(items), batch_size):
                chunk = order[s : s + batch_size]
                done |= dict(zip(chunk, predict_batch(lm, [items[i] for i in chunk], labels[task], n_new)))
                bar.update(len(chunk))
            out += [done[i] for i in range(len(items))]
    finally:
        bar.close()
        lm.model.train(was_training)
    return out


def accuracy_and_f1(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over `labels` (a label never predicted nor gold is left out; a prediction outside
    `labels`, e.g. an unparseable continuation, counts as wrong for every class)."""
    if not gold:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    acc = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    f1s = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}
