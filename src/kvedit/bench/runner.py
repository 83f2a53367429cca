"""The unit of benchmark work: edit one batch of cases, score it, revert it, return its records.

`kvedit bench` runs batches in its own process; with `--ray` each worker holds a `BatchRunner` of its
own over its own copy of the model, so both paths produce records the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..editing.delta import WeightDelta
from ..data.requests import EditRequest
from ..editing.registry import edit, get_method, optimize_edit_targets, prepare
from ..editing.target_store import TargetStore, reused_targets, store_folder
from ..editing.targets import GROUP_SIZE
from ..data.propagation import case_edits
from ..evaluation.easyedit import Predictions, locality_unchanged
from ..evaluation.generation import AttributeSnippets, generation_case_metrics
from ..evaluation.suites import Suite
from ..models.cache import cache_dir
from ..models.lm import LM
from .config import RunSpec


#: case_id -> {argmax key: the unedited model's argmax ids along each probe's answer} (EasyEdit's locality)
UneditedPredictions = dict[Any, dict[str, Predictions]]


def neighborhood_predictions(records: Sequence[dict[str, Any]], suite: Suite) -> UneditedPredictions:
    """case_id → the argmax ids of each of `suite.locality`'s argmax keys, for the records that carry them."""
    out: UneditedPredictions = {}
    for r in records:
        found = {key: r[key] for key, _ in suite.locality if key in r}
        if found:
            out[r["case_id"]] = found
    return out


def add_unchanged(records: Sequence[dict[str, Any]], unedited: UneditedPredictions, suite: Suite) -> None:
    """Set each of `suite.locality`'s unchanged keys (in place) on the records that have its argmax key and whose
    unedited ids are known: the fraction of answer positions the edit left unchanged, averaged over probes."""
    for record in records:
        before = unedited.get(record["case_id"], {})
        for argmax, unchanged in suite.locality:
            if argmax in record and argmax in before:
                record[unchanged] = locality_unchanged(record[argmax], before[argmax])


@dataclass
class BatchRunner:
    """Scores cases and runs edits on one model.

    settings: hparam overrides for every method (the bench's `extra`, statistics source and size).
    unedited_predictions: case_id → the unedited model's argmax ids per locality key (EasyEdit's locality).
    reuse_targets: runs whose every batch starts from the unedited weights (one at a time, or batches that are
        not sequential) take target vectors optimised before for the same case, settings and weights from the
        cache (`target_store`); their edit time adds the stored optimisation time.
    group_targets: with reuse_targets, `optimize_targets_ahead` optimises a run's target vectors in groups of
        GROUP_SIZE before its edits (1.7× less time per request than one at a time at 2 threads, 1.07× at one);
        each edit's time then counts its share of its group's optimisation.
    """

    lm: LM
    suite: Suite
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    snippets: AttributeSnippets | None = None
    unedited_predictions: UneditedPredictions = field(default_factory=dict)
    progress: bool = True
    reuse_targets: bool = False
    group_targets: bool = False
    _targets: TargetStore | None = field(default=None, init=False, repr=False)  # opened at the first reuse

    def evaluate(self, cases: Sequence[Any]) -> list[dict[str, Any]]:
        """The suite's per-case metrics of `cases` (edit requests, or a propagation set's cases), with
        fluency/consistency where the cases have generation prompts and EasyEdit's locality where the unedited
        model's predictions are known."""
        records = self.suite.case_metrics(self.lm, cases)
        if self.suite.generation:
            generated = generation_case_metrics(
                self.lm, [case_edits(c)[0] for c in cases], seed=self.seed, snippets=self.snippets
            )
            records = [c | g for c, g in zip(records, generated)]
        add_unchanged(records, self.unedited_predictions, self.suite)
        return records

    def edit_kwargs(self, spec: RunSpec) -> dict[str, Any]:
        kwargs = dict(self.settings) | spec.overrides()
        if not get_method(spec.method).uses_statistics:  # e.g. fine-tuning: statistics settings mean nothing
            kwargs = {k: v for k, v in kwargs.items() if k not in ("stats_source", "stats_tokens")}
        return kwargs

    def prepare(self, spec: RunSpec) -> None:
        """Statistics and templates before the first timed edit, so that no edit's time includes them."""
        start = time.perf_counter()
        prepare(self.lm, spec.method, **self.edit_kwargs(spec))
        elapsed = time.perf_counter() - start
        if self.progress and elapsed > 1.0:
            tqdm.write(f"{spec.key}: statistics and context templates ready in {elapsed:.1f} s (cached for later runs)")

    def records(
        self,
        spec: RunSpec,
        batch: Sequence[Any],
        delta: WeightDelta,
        elapsed: float,
        index: int,
        extra: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The batch's records after its edit: metrics per case plus the run's settings and edit time
        (`elapsed`: the wall time, plus the stored optimisation time of reused targets)."""
        base = {
            "run": spec.key,
            "method": spec.method,
            "layer": spec.layer,
            "batch_size": len(batch),
            "sequential": spec.sequential,
            "batch": index,
            "time_s": elapsed,
            "steps": delta.metadata.get("result", {}).get("steps"),
        } | (extra or {})
        edits = sum(len(case_edits(c)) for c in batch)
        if edits != len(batch):  # cases of several facts each (MQuAKE): the requests the call applied
            base["edits"] = edits
        # the edited model's argmax ids served for locality; only the unedited ones are kept
        argmax = {key for key, _ in self.suite.locality}
        return [{k: v for k, v in m.items() if k not in argmax} | base for m in self.evaluate(batch)]

    def edit(self, spec: RunSpec, batch: Sequence[Any], history: Any | None = None) -> tuple[WeightDelta, float, float]:
        """Edit `batch` in place (one call applying every request of its cases, `case_edits`); return the delta, the edit's time in s and, of that time, the seconds of
        target vectors served from the store (their optimisation time when first computed; `reuse_targets`
        applies to runs that are not sequential, where every batch starts from the unedited weights: a request's
        target vectors never depend on the others in its batch). history: a sequential run's state for methods that
        carry one (`EditMethod.carries_history`); the next one is `delta.records.history`."""
        reuse = self.reuse_targets and not spec.sequential
        with reused_targets(self.lm, store=self._store()) if reuse else nullcontext() as store:
            start = time.perf_counter()
            extra = {"history": history} if history is not None else {}
            requests = [r for case in batch for r in case_edits(case)]
            delta = edit(self.lm, requests, spec.method, **self.edit_kwargs(spec), **extra)
            elapsed = time.perf_counter() - start
        reused = store.take_reused_s() if store is not None else 0.0
        return delta, elapsed + reused, reused

    def _store(self) -> TargetStore:
        """The run's target store on disk, opened at the first use: the weights are the unedited ones then, and the
        folder is named by their fingerprint."""
        if self._targets is None:
            self._targets = TargetStore(store_folder(self.lm, cache_dir() / "targets"))
        return self._targets

    def optimize_targets_ahead(self, spec: RunSpec, batches: Sequence[Sequence[Any]]) -> None:
        """With `group_targets` (and `reuse_targets`, not sequential): the target vectors of `batches`' edits,
        optimised in groups into the store before the edits take them (`optimize_edit_targets`). Stored group by
        group, so a killed run keeps what it finished. A no-op for editors with no target vectors."""
        if not (self.group_targets and self.reuse_targets) or spec.sequential:
            return
        if get_method(spec.method).target_plan is None:
            return
        calls = [[r for case in batch for r in case_edits(case)] for batch in batches]
        chunks: list[list[list[EditRequest]]] = [[]]
        for call in calls:  # chunks of whole calls holding at least GROUP_SIZE requests
            if sum(map(len, chunks[-1])) >= GROUP_SIZE:
                chunks.append([])
            chunks[-1].append(call)
        store = self._store()
        with tqdm(
            total=len(calls), desc=f"{spec.key}: target vectors ahead", unit="edit", disable=not self.progress
        ) as bar:
            for chunk in chunks:
                with reused_targets(self.lm, store=store):
                    optimize_edit_targets(self.lm, chunk, spec.method, **self.edit_kwargs(spec))
                bar.update(len(chunk))
        store.take_reused_s()  # targets found here are served again to the edits, which count them then

    def run_batch(self, spec: RunSpec, batch: Sequence[Any], index: int) -> list[dict[str, Any]]:
        """Edit, score and revert one batch (the model is left as it was, bit for bit: `WeightDelta.revert`)."""
        delta, elapsed, reused = self.edit(spec, batch)
        extra: dict[str, Any] = {"targets_reused_s": reused} if reused else {}
        if reused and self.group_targets:
            extra["targets_grouped"] = GROUP_SIZE  # optimised ahead, in groups of up to this many requests
        try:
            return self.records(spec, batch, delta, elapsed, index, extra)
        finally:
            delta.revert(self.lm)
