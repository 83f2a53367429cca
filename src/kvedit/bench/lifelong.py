"""What a sequential (lifelong) bench run measures after each batch, on samples fixed once per folder.

After every batch of a `kvedit bench --sequential` run, one record goes to sequence.jsonl:

- ``new``: the new batch's efficacy, paraphrase and specificity (the suite's three success metrics);
- ``retention``: efficacy and paraphrase of earlier edits (batches before the new one). All of them while there are
  at most ``retention_sample``; beyond that the ``retention_sample`` earlier cases that rank first in a seeded
  permutation of the run's cases drawn once (``state/samples.json``), so the sample only changes when an earlier
  case of higher rank joins it;
- ``specificity``: the suite's specificity on the neighbourhood prompts of a fixed sample of ``specificity_sample``
  cases drawn once from the run's cases (edited or not yet). Neighbourhood prompts ask about other subjects than
  any case's own subject, so these are unrelated facts the run never edits; the same prompts are scored at every
  batch (and before the first: the record of batch -1);
- ``general``: `GeneralAbilityProbe` (perplexity on a fixed slice of held-out text, zero-shot label ranking on a
  fixed sample of the classification tasks), when a text is given;
- ``weights``: per edited matrix, ‖W − W₀‖_F and ‖W − W₀‖_F / ‖W₀‖_F against the weights before the run.

Intervals: metrics over cases are the mean with a 95 % percentile bootstrap interval over cases (2,000
resamples, seeded: `mean_with_ci`); label accuracy has a 95 % Wilson interval over all probe examples pooled.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .folder import BenchError

if TYPE_CHECKING:  # the CLI reads the defaults here before any model library is imported
    from ..data.requests import EditRequest
    from ..editing.delta import WeightDelta
    from ..evaluation.general_ability import GeneralAbilityProbe
    from ..evaluation.suites import Suite
    from ..models.lm import LM

#: the shared data the CLI measures general ability on by default (relative to the working directory)
DEFAULT_GENERAL_TEXT = "../shared/data/corpus/wikitext-2/test.txt"
DEFAULT_GENERAL_TASKS = "../shared/data/tasks"
#: short names of the suite's three success metrics, in `Suite.score_of` order
SHORT = ("efficacy", "paraphrase", "specificity")


@dataclass(frozen=True)
class LifelongSettings:
    """What is measured after each sequential batch. `general_text` None: no general-ability probe;
    `general_tasks` None: perplexity only."""

    retention_sample: int = 200
    specificity_sample: int = 100
    general_text: str | None = None
    general_tasks: str | None = None
    general_tokens: int = 10_000
    general_window: int = 256
    general_per_task: int = 50
    general_every: int = 1  # probe general ability after every k-th batch (and the last); it costs minutes per call
    retention_every: int = 1  # retention and specificity after every k-th batch (and the last); ≈ 1 min per call
    seed: int = 0

    def __post_init__(self) -> None:
        if self.retention_sample < 1 or self.specificity_sample < 0:
            raise BenchError(
                f"--retention-sample must be >= 1 and --specificity-sample >= 0, got "
                f"{self.retention_sample} and {self.specificity_sample}"
            )
        if self.general_every < 1 or self.retention_every < 1:
            raise BenchError(
                f"--general-every and --retention-every must be >= 1, got {self.general_every} and "
                f"{self.retention_every}"
            )
        if self.general_tokens < self.general_window or self.general_window < 2 or self.general_per_task < 1:
            raise BenchError(
                f"need --general-tokens >= --general-window >= 2 and --general-per-task >= 1, got "
                f"{self.general_tokens}, {self.general_window} and {self.general_per_task}"
            )
        if self.general_text is not None and not Path(self.general_text).is_file():
            raise BenchError(
                f"--general-text {self.general_text}: expected a text file (WikiText-2's test.txt); "
                "pass another with --general-text or switch the probe off with --no-general"
            )
        if self.general_tasks is not None and not Path(self.general_tasks).is_dir():
            raise BenchError(
                f"--general-tasks {self.general_tasks}: expected a folder with cb/, boolq/, copa/, "
                "qnli/; pass another or --no-general-tasks"
            )

    def key(self) -> dict[str, Any]:
        """The settings as stored in state/lifelong.json (paths made absolute): a resumed run must match."""
        data = asdict(self)
        for name in ("general_text", "general_tasks"):
            if data[name] is not None:
                data[name] = str(Path(data[name]).resolve())
        return data


def wilson(hits: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95 % Wilson score interval of a proportion, × 100; None without observations."""
    if n == 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


@dataclass(frozen=True)
class Samples:
    """The fixed samples of a folder: `order`, every case id ranked by a seeded permutation (retention picks the
    earlier cases of lowest rank), and `specificity`, the case ids whose neighbourhood prompts are scored."""

    order: tuple[Any, ...]
    specificity: tuple[Any, ...]

    @classmethod
    def load_or_draw(cls, path: Path, cases: Sequence[EditRequest], settings: LifelongSettings) -> "Samples":
        """The samples stored at `path`, extended by new cases (a grown --n) in a seeded order; else drawn now."""
        ids = [c.case_id for c in cases]
        rng = random.Random(settings.seed)
        if path.exists():
            stored = json.loads(path.read_text())
            order = list(stored["order"])
            known = set(order)
            new = [i for i in ids if i not in known]
            rng.shuffle(new)
            samples = cls(tuple(order + new), tuple(stored["specificity"]))
        else:
            order = list(ids)
            rng.shuffle(order)
            with_neighbours = [c.case_id for c in cases if c.neighborhood_prompts]
            chosen = set(
                random.Random(settings.seed + 1).sample(
                    with_neighbours, min(settings.specificity_sample, len(with_neighbours))
                )
            )
            samples = cls(tuple(order), tuple(i for i in ids if i in chosen))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"order": list(samples.order), "specificity": list(samples.specificity)}) + "\n")
        return samples

    def retention(self, earlier: Sequence[EditRequest], size: int) -> list[EditRequest]:
        """All of `earlier` if at most `size`, else the `size` of lowest rank (in rank order)."""
        if len(earlier) <= size:
            return list(earlier)
        rank = {case_id: i for i, case_id in enumerate(self.order)}
        return sorted(earlier, key=lambda r: rank[r.case_id])[:size]


class LifelongMeter:
    """Scores one state of the model: the new batch, retention, specificity, general ability, weight change."""

    def __init__(
        self, lm: LM, suite: Suite, cases: Sequence[EditRequest], settings: LifelongSettings, samples: Samples
    ) -> None:
        self.lm, self.suite, self.settings, self.samples = lm, suite, settings, samples
        by_id = {c.case_id: c for c in cases}
        self.unrelated = [replace(by_id[i], paraphrase_prompts=()) for i in samples.specificity if i in by_id]
        self._probe: GeneralAbilityProbe | None = None

    @property
    def probe(self) -> GeneralAbilityProbe | None:
        """The general-ability probe, built on first use (None when switched off)."""
        from ..evaluation.general_ability import GeneralAbilityProbe

        s = self.settings
        if self._probe is None and s.general_text is not None:
            self._probe = GeneralAbilityProbe.build(
                self.lm,
                s.general_text,
                s.general_tasks,
                s.general_tokens,
                s.general_window,
                s.general_per_task,
                seed=s.seed,
            )
        return self._probe

    def _stats(self, cases: Sequence[Mapping[str, Any]], keys: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        from ..evaluation.comparison import mean_with_ci

        out = {}
        for key, name in zip(keys, names):
            values = [c[key] for c in cases if c.get(key) is not None]
            out[name] = mean_with_ci(values, 100.0, seed=self.settings.seed)
        return out

    def measure(
        self,
        new_cases: Sequence[Mapping[str, Any]] | None,
        earlier: Sequence[EditRequest],
        chain: WeightDelta | None,
        general: bool = True,
        checks: bool = True,
    ) -> dict[str, Any]:
        """One record's measurements (metrics × 100); `new_cases`: the new batch's per-case metrics (None: the
        record before the first batch); `earlier`: the cases edited before the new batch; `chain`: W₀ → now;
        `general`: run the general-ability probe (if there is one); `checks`: measure retention and specificity."""
        from ..evaluation.general_ability import weight_change

        start = time.perf_counter()
        keys = self.suite.score_of
        record: dict[str, Any] = {}
        if new_cases is not None:
            record["new"] = self._stats(new_cases, keys, SHORT)
        sample = self.samples.retention(earlier, self.settings.retention_sample) if checks else []
        if sample:
            scored = self.suite.case_metrics(self.lm, [replace(r, neighborhood_prompts=()) for r in sample])
            record["retention"] = self._stats(scored, keys[:2], SHORT[:2])
            record["retention_cases"] = [r.case_id for r in sample]
            record["retention_values"] = {n: [c.get(k) for c in scored] for k, n in zip(keys[:2], SHORT[:2])}
        if self.unrelated and checks:
            scored = self.suite.case_metrics(self.lm, self.unrelated)
            record["specificity"] = self._stats(scored, keys[2:], SHORT[2:])["specificity"]
            record["specificity_values"] = [c.get(keys[2]) for c in scored]
        if general and self.probe is not None:
            probed = self.probe.measure(self.lm)
            accuracy: dict[str, float] = probed["label_accuracy"]  # type: ignore[assignment]
            counts = Counter(e.task for e in self.probe.examples)
            n = sum(counts.values())
            hits = round(sum(accuracy.get(t, 0.0) * c for t, c in counts.items()))
            record["general"] = {
                "perplexity": probed["perplexity"],
                "label_accuracy": {k: 100 * v for k, v in accuracy.items()},
                "label_ci": wilson(hits, n),
                "examples": n,
            }
        if chain is not None:
            relative = weight_change(self.lm, {n: t.float() for n, t in chain.before.items()})
            record["weights"] = {
                n: {"norm": float(chain.update(n).norm()), "relative": relative[n]} for n in chain.names
            }
        record["eval_s"] = time.perf_counter() - start
        return record


def check_settings(path: Path, settings: LifelongSettings) -> None:
    """Store the settings at `path`, or refuse ones that differ from those stored (a resumed run must match)."""
    key = settings.key()
    if path.exists():
        # a setting added after the folder was written was at its default then
        old = {f.name: f.default for f in fields(LifelongSettings)} | json.loads(path.read_text())
        diff = sorted(k for k in key if old.get(k) != key[k])
        if diff:
            raise BenchError(
                f"{path.parent.parent} measured its sequential runs with other settings "
                f"({', '.join(f'{k}: {old.get(k)} vs {key[k]}' for k in diff)}); use the same "
                "options or another --out"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key, indent=2) + "\n")
