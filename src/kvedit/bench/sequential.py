"""Sequential editing: batches applied one after another onto the edited model, scored as they go.

After each batch the new edits are scored, and so are all earlier ones again (do they still hold?)
— the curve a user reads to see when editing collapses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..data.requests import EditRequest
from ..editing.delta import WeightDelta
from ..editing.registry import edit
from ..evaluation.counterfact import counterfact_case_metrics, summarize_counterfact
from ..models.lm import LM


def chain(deltas: Sequence[WeightDelta], metadata: dict[str, Any] | None = None) -> WeightDelta:
    """One delta equal to applying `deltas` in order: each parameter's first `before`, last `after`."""
    before: dict = {}
    after: dict = {}
    for delta in deltas:
        for name in delta.names:
            before.setdefault(name, delta.before[name])
            after[name] = delta.after[name]
    return WeightDelta(before, after, metadata or {"method": "chain", "parts": [d.metadata for d in deltas]})


def edit_in_order(
    lm: LM,
    batches: Sequence[list[EditRequest]],
    step: Callable[[int, list[EditRequest]], WeightDelta],
    desc: str = "sequential",
    progress: bool = True,
    leave: bool = True,
    start: int = 0,
    status: Callable[[], Mapping[str, Any]] | None = None,
    keep: bool = True,
) -> list[WeightDelta]:
    """The one sequential loop: `step(index, batch)` edits each batch onto the model the earlier ones left and
    returns its delta. Returns the deltas (the model stays edited); on any failure every delta already applied is
    reverted, newest first, and the error propagates (`step` reverts its own batch if it fails after editing).

    start: the index of `batches[0]` in the whole run (a resumed run: the bar says batch start + i of start + n);
    status: after each batch, what the bar shows beside the count (e.g. the current retention);
    keep: False for long runs whose caller keeps the weights another way (a chain): no delta is held (returns []),
    and on a failure the caller restores the model (`step` still reverts its own batch)."""
    deltas: list[WeightDelta] = []
    bar = tqdm(total=start + len(batches), initial=start, desc=desc, unit="batch", disable=not progress, leave=leave)
    try:
        for index, batch in enumerate(batches, start):
            delta = step(index, batch)
            if keep:
                deltas.append(delta)
            bar.update(1)
            if status is not None:
                bar.set_postfix(status(), refresh=True)
    except BaseException:
        for delta in reversed(deltas):
            delta.revert(lm)
        raise
    finally:
        bar.close()
    return deltas


def sequential_edit(
    lm: LM,
    requests: Sequence[EditRequest],
    method: str,
    batch_size: int = 1,
    progress: bool = True,
    **overrides: Any,
) -> tuple[WeightDelta, list[dict[str, Any]]]:
    """Edit `requests` in batches of `batch_size`, each onto the model the previous ones left.

    Returns the combined delta (the model stays edited) and one record per batch: edit time,
    the batch's own metrics, and the metrics of every request edited so far (`all_*`).
    On any failure every batch already applied is reverted too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    history: list[dict[str, Any]] = []
    batches = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]

    def step(index: int, batch: list[EditRequest]) -> WeightDelta:
        start = time.perf_counter()
        delta = edit(lm, batch, method, **overrides)
        elapsed = time.perf_counter() - start
        try:
            done = [r for b in batches[: index + 1] for r in b]
            record: dict[str, Any] = {"batch": index, "n_edited": len(done), "time_s": elapsed}
            record |= {f"batch_{k}": v for k, v in summarize_counterfact(counterfact_case_metrics(lm, batch)).items()}
            record |= {f"all_{k}": v for k, v in summarize_counterfact(counterfact_case_metrics(lm, done)).items()}
        except BaseException:
            delta.revert(lm)
            raise
        history.append(record)
        return delta

    deltas = edit_in_order(lm, batches, step, desc=f"{method} sequential", progress=progress)
    return chain(
        deltas, {"method": method, "sequential": True, "batch_size": batch_size, "parts": [d.metadata for d in deltas]}
    ), history
