"""General ability during long runs of edits: does the model still model text and classify?

A `GeneralAbilityProbe` is built once from fixed data and then measures any state of the model the same way:

- perplexity on a fixed slice of held-out text (WikiText-2's test split by default): the first `tokens` tokens,
  cut into windows of `window` tokens read independently; exp of the mean next-token NLL (nats) over every
  predicted token;
- zero-shot label ranking on a fixed sample of classification tasks (CB, BoolQ, COPA, QNLI from the seed's
  task files): for each example the task's label word with the highest likelihood after the prompt, accuracy per
  task and their mean (`tuning.evaluate.predict`, the same scorer `kvedit tune` reports);

and `weight_change` gives ‖W − W₀‖ / ‖W₀‖ per edited matrix against a snapshot taken before the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.textfiles import read_utf8
from ..models.lm import LM
from ..tuning.evaluate import predict
from ..tuning.tasks import TASKS, Example, load_task

#: the seed's classification tasks whose validation files ship with the shared data
PROBE_TASKS = ("cb", "boolq", "copa", "qnli")


@dataclass(frozen=True)
class GeneralAbilityProbe:
    """Fixed data to score a model on: `windows` `[n, window]` token ids of held-out text, `examples` of
    classification tasks with their label words `labels[task]`."""

    windows: torch.Tensor
    examples: tuple[Example, ...]
    labels: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(
        cls,
        lm: LM,
        text: str | Path,
        tasks_dir: str | Path | None = None,
        tokens: int = 10_000,
        window: int = 256,
        per_task: int = 50,
        tasks: Sequence[str] = PROBE_TASKS,
        seed: int = 0,
    ) -> "GeneralAbilityProbe":
        """Tokenise the first `tokens` tokens of the text file `text` into full windows (the tail that does not
        fill one is dropped), and take `per_task` test examples of each task from `tasks_dir/<task>/` (a fixed
        seeded sample where a task has only an evaluation split)."""
        if tokens < window or window < 2:
            raise ValueError(f"need tokens >= window >= 2, got tokens={tokens}, window={window}")
        ids = lm.tokenizer(read_utf8(text), add_special_tokens=False)["input_ids"][:tokens]
        usable = len(ids) // window * window
        if not usable:
            raise ValueError(f"{text} holds fewer than {window} tokens")
        windows = torch.tensor(ids[:usable]).view(-1, window)
        examples: list[Example] = []
        labels: dict[str, tuple[str, ...]] = {}
        if tasks_dir is not None:
            for task in tasks:
                if task not in TASKS:
                    raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
                data = load_task(TASKS[task], Path(tasks_dir) / task, 1, per_task, seed)
                examples += data.test
                labels[task] = TASKS[task].labels
        return cls(windows, tuple(examples), labels)

    @torch.no_grad()
    def perplexity(self, lm: LM, batch_size: int = 8) -> float:
        """exp(mean NLL) of every token after the first of each window."""
        total, count = 0.0, 0
        for start in range(0, len(self.windows), batch_size):
            ids = self.windows[start : start + batch_size].to(lm.device)
            logits = lm.model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
        return float(torch.exp(torch.tensor(total / count)))

    def label_accuracy(self, lm: LM, batch_size: int = 8) -> dict[str, float]:
        """Zero-shot label-ranking accuracy per task and their mean ("mean"); empty without tasks."""
        if not self.examples:
            return {}
        predictions = predict(lm, self.examples, self.labels, batch_size, desc="general ability")
        per_task: dict[str, list[bool]] = {}
        for p in predictions:
            per_task.setdefault(p.task, []).append(p.ranked == p.gold)
        accuracy = {t: sum(hits) / len(hits) for t, hits in per_task.items()}
        return accuracy | {"mean": sum(accuracy.values()) / len(accuracy)}

    def measure(self, lm: LM, batch_size: int = 8) -> dict[str, object]:
        """{"perplexity": float, "label_accuracy": {task: accuracy, "mean": …}}."""
        return {"perplexity": self.perplexity(lm, batch_size), "label_accuracy": self.label_accuracy(lm, batch_size)}


def weight_snapshot(lm: LM, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named parameters, the W₀ that `weight_change` compares against."""
    return {n: lm.model.get_parameter(n).detach().float().cpu().clone() for n in names}


def weight_change(lm: LM, snapshot: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖W − W₀‖_F / ‖W₀‖_F per parameter of `snapshot`; a parameter that grew (memories added) compares its first
    rows and counts the new ones in full."""
    out = {}
    for name, before in snapshot.items():
        now = lm.model.get_parameter(name).detach().float().cpu()
        if now.shape != before.shape:
            pad = [x for b, a in zip(before.shape[::-1], now.shape[::-1]) for x in (0, a - b)]
            before = F.pad(before, pad)
        out[name] = float((now - before).norm() / before.norm())
    return out
