"""One sequential bench run over its folder, resumable after a kill at any batch.

State of a run, in ``state/<run>/`` (``<run>`` is the run's key with spaces as ``_``)::

    chain.safetensors        a WeightDelta from the weights before the run (W₀) to those after the last finished
                             batch: applying it restores the run's model bit for bit; reverting it restores W₀.
                             Its metadata counts the finished batches (`batches_done`): the commit point
    chain.json               the same metadata, for people
    history-<k>.safetensors  methods that carry a history (AlphaEdit): the history after k finished batches

and, for the folder, ``state/samples.json`` (the fixed samples, `lifelong.Samples`), ``state/lifelong.json`` (the
measurement settings, which a resumed run must match) and ``sequence.jsonl`` (one record per run and batch, plus
batch -1: the unedited model).

After each batch: its cases' records and its sequence record are appended, then the history is written, then the
chain (the commit). A kill before the chain is written leaves the batch to redo: its records are written again
(identical; readers keep the last per run and batch) and cases.jsonl keeps the first.
Folders written before the chain existed (one patch per batch in ``patches/<run>/``) resume from those patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.jsonl import append_jsonl
from ..data.requests import EditRequest
from ..editing.alphaedit_state import AlphaEditHistory
from ..editing.delta import WeightDelta
from ..editing.registry import get_method
from ..runtime import peak_rss_gb
from .config import RunSpec
from .folder import SEQUENCE_FILE, sequence_records
from .lifelong import LifelongMeter, Samples, check_settings
from .sequential import chain, edit_in_order

if TYPE_CHECKING:
    from .harness import Bench, Done


def run_dir(out: Path, spec: RunSpec) -> Path:
    """`state/<run>/` of a run."""
    return out / "state" / spec.key.replace(" ", "_")


def history_path(folder: Path, batches_done: int) -> Path:
    return folder / f"history-{batches_done:05d}.safetensors"


def load_chain(folder: Path) -> tuple[int, WeightDelta | None]:
    """(finished batches, the chain W₀ → now) of a run's state folder; (0, None) when it holds none."""
    path = folder / "chain.safetensors"
    if not path.exists():
        return 0, None
    delta = WeightDelta.load(path)
    return int(delta.metadata["batches_done"]), delta


class SequentialRun:
    """The batches of `spec` applied one after another on `bench`'s model, measured after each (`LifelongMeter`),
    the state saved after each so that a killed run continues where it stopped; the model is left as it was."""

    def __init__(self, bench: Bench, spec: RunSpec) -> None:
        self.bench, self.spec = bench, spec
        self.folder = run_dir(bench.out, spec)
        self.batches = bench._batches(spec)
        self.carries_history = get_method(spec.method).carries_history

    def _legacy(self, done: Done) -> tuple[int, WeightDelta | None]:
        """Finished batches of a folder from before the chain: re-apply `patches/<run>/batch-*.safetensors`
        while their cases are recorded; returns them chained (applied)."""
        patches = self.bench.out / "patches" / self.spec.key.replace(" ", "_")
        deltas = []
        for index, batch in enumerate(self.batches):
            patch = patches / f"batch-{index:05d}.safetensors"
            if not patch.exists() or any((self.spec.key, r.case_id) not in done for r in batch):
                break
            delta = WeightDelta.load(patch)
            delta.apply(self.bench.lm)
            deltas.append(delta)
        return len(deltas), chain(deltas, self._chain_meta(len(deltas))) if deltas else None

    def _chain_meta(self, batches_done: int, history: AlphaEditHistory | None = None) -> dict[str, Any]:
        earlier = sum(len(b) for b in self.batches[:batches_done])
        meta = {
            "method": "chain",
            "run": self.spec.key,
            "batches_done": batches_done,
            "n_edited": earlier,
            "model_name": self.bench.lm.name,
            "model_fingerprint": self.bench.lm.base_fingerprint,
        }
        return meta | ({"history_digest": history.digest()} if history is not None else {})

    def pending(self, done: Done) -> bool:
        """Whether any batch is left: a case without a record, or batches after the chain's last."""
        if any((self.spec.key, c.case_id) not in done for c in self.bench.cases):
            return True
        path = self.folder / "chain.safetensors"
        return path.exists() and load_chain(self.folder)[0] < len(self.batches)

    def run(self, done: Done) -> None:
        """Restore the last finished batch (chain and history), then edit and measure the rest."""
        bench, spec, lm = self.bench, self.spec, self.bench.lm
        if not self.pending(done):
            return
        bench.runner.prepare(spec)
        check_settings(bench.out / "state" / "lifelong.json", bench.config.lifelong)
        samples = Samples.load_or_draw(bench.out / "state" / "samples.json", bench.cases, bench.config.lifelong)
        meter = LifelongMeter(lm, bench.suite, bench.cases, bench.config.lifelong, samples)
        start, restored = load_chain(self.folder)
        history: AlphaEditHistory | None = None
        if self.carries_history:
            history = AlphaEditHistory.load(history_path(self.folder, start)) if start else AlphaEditHistory()
            if restored is not None and restored.metadata.get("history_digest", history.digest()) != history.digest():
                raise ValueError(f"{history_path(self.folder, start)} is not the history the chain was saved with")
        if restored is not None:
            restored.apply(lm)  # refuses unless the model holds W₀ bit for bit
        else:
            start, restored = self._legacy(done)
            if start and self.carries_history:
                raise ValueError(f"{spec.key}: per-batch patches hold no {spec.method} history; use another --out")
        state: dict[str, Any] = {"chain": restored, "history": history, "retention": None}
        sequence = self.bench.out / SEQUENCE_FILE
        base = {
            "run": spec.key,
            "method": spec.method,
            "layer": spec.layer,
            "batch_size": spec.batch_size,
            "n_batches": len(self.batches),
        }
        if start == 0 and not any(r["batch"] == -1 for r in sequence_records(bench.out, spec.key)):
            append_jsonl(sequence, [base | {"batch": -1, "n_edited": 0} | meter.measure(None, [], None)])

        def step(index: int, batch: list[EditRequest]) -> WeightDelta:
            delta, elapsed, _ = bench.runner.edit(spec, batch, history=state["history"])
            try:
                earlier = [r for b in self.batches[:index] for r in b]
                n_edited = len(earlier) + len(batch)
                records = bench.runner.records(spec, batch, delta, elapsed, index, {"n_edited": n_edited})
                now = chain([d for d in (state["chain"], delta) if d is not None], self._chain_meta(index + 1))
                settings, last = bench.config.lifelong, index == len(self.batches) - 1
                measured = meter.measure(
                    records,
                    earlier,
                    now,
                    general=(index + 1) % settings.general_every == 0 or last,
                    checks=(index + 1) % settings.retention_every == 0 or last,
                )
                if "retention" in measured:
                    for r in records:
                        r["earlier_efficacy"] = measured["retention"]["efficacy"]["mean"]
                history = delta.records.history if self.carries_history else None
                record = base | {"batch": index, "n_edited": n_edited, "time_s": elapsed} | measured
                record["peak_rss_gb"] = peak_rss_gb()  # the process's peak so far (model, edit and evaluation)
                if history is not None:
                    record["history_digest"] = history.digest()
                    now.metadata["history_digest"] = history.digest()
                bench._append_new(spec, records, done)
                append_jsonl(sequence, [record])
                self._commit(now, history, index + 1)
            except BaseException:
                delta.revert(lm)  # the batches before it are reverted by edit_in_order
                raise
            state.update(chain=now, history=history)
            if "retention" in measured:  # between checks the bar keeps the last measured retention
                state["retention"] = measured["retention"]["efficacy"]["mean"]
            return delta

        def status() -> Mapping[str, Any]:
            value = state["retention"]
            return {"retention": "–" if value is None else f"{value:.1f}"}

        try:  # the model holds state["chain"]'s edited weights between batches: reverting it restores W₀
            edit_in_order(
                lm,
                self.batches[start:],
                step,
                desc=spec.key,
                progress=bench.progress,
                leave=False,
                start=start,
                status=status,
                keep=False,
            )
        finally:
            if state["chain"] is not None:
                state["chain"].revert(lm)

    def _commit(self, now: WeightDelta, history: AlphaEditHistory | None, batches_done: int) -> None:
        """The history after `batches_done` batches, then the chain (the commit point), then older histories go."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if history is not None:
            history.save(history_path(self.folder, batches_done))
        now.save(self.folder / "chain.safetensors")
        for old in self.folder.glob("history-*.safetensors"):
            if old != history_path(self.folder, batches_done):
                old.unlink()
