"""Choosing every editor's preset alike: one grid, one tuning split, one criterion.

The procedure (issue 13):

1. Keep the CounterFact cases the unedited model answers correctly (`known_filter`), in file order. The first
   `n_tune` of them are the **tuning split**; the next `n_report` are the **report split**, which the tables use
   and the selection never sees.
2. Each editor runs over the same grid of its settings (MEMIT and PMET share one: edit-layer window, λ and the
   δ weight decay; ROME: layer and weight decay; fine-tuning: layer, from 0, and learning rate; KN: threshold,
   integration steps and edit factor; T-Patcher: memory-loss weight, neurons per edit and learning rate), one
   edit at a time on every tuning case, reverted after scoring. Every edit starts from the unedited weights, so
   the target vectors of settings that differ only in λ are optimised once and reused (`reused_targets`); their
   edit times are then the solve alone. Likewise KN's attributions are integrated once per case and step count
   and reused across thresholds and edit factors (`reused_attributions`).
3. The setting with the highest Score (harmonic mean of efficacy, paraphrase and specificity success, × 100) is
   chosen; ties go to the setting listed first in the grid, which lists the smaller edit first (larger λ, larger
   δ decay, smaller learning rate) within each layer choice.

Scoring uses the CounterFact probability metrics only (no generation): fluency does not enter the choice.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from statistics import harmonic_mean, mean
from typing import Any

from tqdm.auto import tqdm

from ..data.jsonl import append_jsonl, read_jsonl
from ..data.requests import EditRequest
from ..editing.registry import edit, get_method, prepare
from ..editing.kn import reused_attributions
from ..editing.target_store import reused_targets
from ..evaluation.counterfact import counterfact_case_metrics
from ..evaluation.known import first_known
from ..models.lm import LM

METRICS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
#: Fine-tuning's learning rates, smallest first (a tie goes to the smaller step). The default preset's 2e-3 was
#: chosen on SmolLM2's demo facts; on Gemma-3 it wrecks specificity (FT on values at layer 2: 20 % at 2e-3,
#: 58 % at 5e-4 on the tuning split), so the learning rate is part of the grid for every model. 1.25e-4 was
#: added when Gemma's first sweep chose the smallest value, 2.5e-4, so that the grid brackets the choice.
FT_LEARNING_RATES = (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3)
DECAYS = (0.5, 1e-3)  # δ weight decay: the first in the whole first stage, the others at its best setting
#: KN (every layer searched, as EasyEdit does): what the references vary (REFERENCE-2 §3.5). The coarse threshold,
#: largest (fewest neurons: the smaller edit) first: EleutherAI 0.3, the paper and EasyEdit 0.2, EasyEdit's GPT-J
#: 0.1. Integration steps: EasyEdit's Llama rows 1 (the gradient at zero × the coefficient), the paper and its
#: GPT-2 XL / GPT-J rows 20. The one-token edit factor: EasyEdit's and EleutherAI's 2, and 8, the paper's λ₂.
KN_THRESHOLDS = (0.3, 0.2, 0.1)
KN_STEPS = (1, 20)
KN_EDIT_FACTORS = (2.0, 8.0)
#: T-Patcher (one new memory per mistaken target token, at the last layer, as the reference): the memory-loss
#: weight (zsRE's 10, FEVER's 5), the neurons per edit (FEVER's 1, zsRE's cap of 5) and the learning rate round
#: the reference's 1e-2 (its only setting, for BART; a new model needs its own). Most locality first.
TPATCHER_MEMORY_WEIGHTS = (10.0, 5.0)
TPATCHER_NEURONS = (1, 5)
TPATCHER_LEARNING_RATES = (3e-3, 1e-2, 3e-2)
#: what `score_setting` adds to a grid setting in a result row
RESULT_FIELDS = (*METRICS, "score", "edit_s", "cases")


@dataclass(frozen=True)
class Split:
    """Known cases in file order: `tune` (selection only) and `report` (tables only); disjoint by construction."""

    tune: tuple[EditRequest, ...]
    report: tuple[EditRequest, ...]


def known_split(lm: LM, requests: Sequence[EditRequest], n_tune: int, n_report: int) -> Split:
    """The first `n_tune` known cases, then the next `n_report` (fewer if the file runs out of known cases)."""
    if n_tune < 1 or n_report < 0:
        raise ValueError(f"n_tune must be >= 1 and n_report >= 0, got {n_tune} and {n_report}")
    known, _ = first_known(lm, requests, n_tune + n_report)  # only as far into the file as the splits need
    if len(known) < n_tune:
        raise ValueError(f"only {len(known)} known cases; the tuning split needs {n_tune}")
    return Split(tuple(known[:n_tune]), tuple(known[n_tune : n_tune + n_report]))


def layer_windows(num_layers: int, width: int, starts: Sequence[int]) -> list[tuple[int, ...]]:
    """Windows of `width` consecutive layers beginning at each of `starts` (those that fit the model)."""
    return [tuple(range(s, s + width)) for s in starts if 0 <= s and s + width <= num_layers]


def default_grid(lm: LM, method: str, rows: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The grid each editor is searched over; MEMIT and every PMET variant share one. Within a layer choice the
    most conservative settings come first (larger λ and δ decay: a smaller change to the model), so a tie in
    Score goes to the smaller edit.

    ROME, MEMIT and PMET search δ weight decay in a second stage: every layer (× λ) choice at decay 0.5 first;
    once `rows` (scored settings) hold all of those, the grid adds the best of them at each other decay. The
    second stage comes last, so a tie keeps 0.5."""
    n = lm.num_layers
    quarter = [max(0, round(n * f)) for f in (0.05, 0.1, 0.2, 0.3)]  # early-to-middle layers, as the papers find
    if method in ("memit",) or method.startswith("pmet"):
        windows = layer_windows(n, min(5, n), sorted(set(quarter)))
        lambdas = (20000.0, 6000.0, 1500.0, 500.0, 150.0, 50.0)  # SmolLM2's old presets: MEMIT 1500, PMET 600
        first = [
            dict(layers=w, mom2_update_weight=lam, weight_decay=DECAYS[0])
            for w, lam in itertools.product(windows, lambdas)
        ]
        return first + _decay_stage(method, first, rows)
    if method == "rome":
        layers = sorted(set(quarter + [round(n * 0.4)]))
        first = [dict(layers=(layer,), weight_decay=DECAYS[0]) for layer in layers if layer < n]
        return first + _decay_stage(method, first, rows)
    if method.startswith("ft"):  # plus layers 0 and 1: ROME's FT baseline edits layer 0, FT-values' best demo layer
        layers = sorted(set([0, 1] + quarter + [round(n * 0.4)]))
        return [dict(layers=(layer,), lr=lr) for layer in layers if layer < n for lr in FT_LEARNING_RATES]
    if method == "kn":
        return [
            dict(layers=tuple(range(n)), max_steps=steps, threshold=threshold, edit_factor=factor)
            for steps, threshold, factor in itertools.product(KN_STEPS, KN_THRESHOLDS, KN_EDIT_FACTORS)
        ]
    if method == "t-patcher":
        return [
            dict(layers=(n - 1,), memory_weight=weight, max_neurons=neurons, lr=lr)
            for weight, neurons, lr in itertools.product(
                TPATCHER_MEMORY_WEIGHTS, TPATCHER_NEURONS, TPATCHER_LEARNING_RATES
            )
        ]
    raise ValueError(f"no grid for method {method!r}; expected memit, pmet*, rome, ft-*, kn or t-patcher")


def setting_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The grid setting a result row (as `select` makes it, or read back from JSON) was scored at."""
    return {k: v for k, v in row.items() if k != "method" and k not in RESULT_FIELDS}


def _decay_stage(
    method: str, first: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The best first-stage setting at each other δ decay, once `rows` score every first-stage setting; else []."""
    by_key = {setting_key(method, {k: r[k] for k in first[0] if k in r}): r for r in rows if r["method"] == method}
    scored = [by_key[key] for s in first if (key := setting_key(method, s)) in by_key]
    if len(scored) < len(first):
        return []
    best = best_setting(method, scored, first)
    return [
        {**{k: best[k] for k in first[0]}, "weight_decay": wd, "layers": tuple(best["layers"])} for wd in DECAYS[1:]
    ]


def best_setting(
    method: str, rows: Sequence[Mapping[str, Any]], grid: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any]:
    """The row of `method` with the highest Score; ties go to the setting listed first in `grid` (rows of
    settings the grid does not list come last, in the order given)."""
    order = {setting_key(method, s): i for i, s in enumerate(grid)}
    mine = [r for r in rows if r["method"] == method]
    if not mine or not grid:
        raise ValueError(f"no rows or no grid for method {method!r}")

    def rank(item: tuple[int, Mapping[str, Any]]) -> tuple[float, int, int]:
        i, row = item
        key = setting_key(method, {k: row[k] for k in grid[0] if k in row})
        return (-row["score"], order.get(key, len(order)), i)

    return min(enumerate(mine), key=rank)[1]


def setting_key(method: str, setting: Mapping[str, Any]) -> str:
    """One string per method and grid setting (layers as a list), to find it again in a log."""
    row = {"method": method, **setting}
    if "layers" in row:
        row["layers"] = list(row["layers"])
    return json.dumps(row, sort_keys=True)


class CaseLog:
    """Finished tuning cases, one JSON line each (setting key, case id, metrics, edit time), so a killed sweep
    resumes inside a setting instead of redoing it. A line cut short by a kill is dropped (`data.jsonl`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[Any, dict[str, Any]]] = {}
        for row in read_jsonl(self.path):
            self.rows.setdefault(row["setting"], {})[row["case_id"]] = row

    def done(self, key: str) -> Mapping[Any, dict[str, Any]]:
        return self.rows.get(key, {})

    def add(self, key: str, row: dict[str, Any]) -> None:
        row = {"setting": key, **row}
        self.rows.setdefault(key, {})[row["case_id"]] = row
        append_jsonl(self.path, [row], sync=False)


def score_setting(
    lm: LM,
    requests: Sequence[EditRequest],
    method: str,
    setting: Mapping[str, Any],
    log: CaseLog | None = None,
    **fixed: Any,
) -> dict[str, Any]:
    """Edit each request alone with `setting`, score it, revert it; means × 100, Score and the median edit time.
    Cases `log` already holds for this setting are read from it, not edited again; new ones are added to it."""
    key = setting_key(method, setting)
    rows, times = [], []
    for request in tqdm(requests, desc=f"{method} cases", unit="case", leave=False):
        logged = log.done(key).get(request.case_id) if log is not None else None
        if logged is None:
            start = time.perf_counter()
            delta = edit(lm, request, method, **fixed, **setting)
            elapsed = time.perf_counter() - start
            try:
                metrics = counterfact_case_metrics(lm, [request])[0]
            finally:
                delta.revert(lm)
            logged = {"case_id": request.case_id, "edit_s": elapsed, **{m: float(metrics[m]) for m in METRICS}}
            if log is not None:
                log.add(key, logged)
        rows.append(logged)
        times.append(logged["edit_s"])
    means = {m: 100.0 * mean(float(r[m]) for r in rows) for m in METRICS}
    score = harmonic_mean(list(means.values())) if all(v > 0 for v in means.values()) else 0.0
    return {**means, "score": score, "edit_s": sorted(times)[len(times) // 2], "cases": len(rows)}


def select(
    lm: LM,
    requests: Sequence[EditRequest],
    methods: Sequence[str],
    grids: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    log: CaseLog | None = None,
    base_preset: str | None = None,
    **fixed: Any,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Score every grid setting of every method on `requests` (the tuning split).

    Returns (one row per method and setting, the chosen setting per method). `fixed` settings (e.g. the
    statistics source) apply to every run; `on_result` sees each row as it is made (to write it at once); `log`
    keeps every finished case, so a killed run resumes inside a setting. `base_preset`: the preset row every
    method that has it starts from (the grid then sets layers, λ, δ decay), e.g. "smollm2" for a model that has
    no rows of its own yet; the others keep their default.
    """
    rows: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    with reused_targets(lm), reused_attributions(lm):
        for method in methods:
            given = {**fixed, "preset": base_preset} if base_preset in get_method(method).presets else fixed
            chosen[method] = _select_one(lm, requests, method, (grids or {}).get(method), rows, on_result, log, given)
    return rows, chosen


def _select_one(
    lm: LM,
    requests: Sequence[EditRequest],
    method: str,
    grid: Sequence[Mapping[str, Any]] | None,
    rows: list[dict[str, Any]],
    on_result: Callable[[dict[str, Any]], None] | None,
    log: CaseLog | None,
    fixed: Mapping[str, Any],
) -> dict[str, Any]:
    """Score `method` at every setting of its grid (`None`: the default grid, both stages), appending to `rows`;
    returns the best setting."""
    known = {f.name for f in fields(get_method(method).make_hparams(None))}
    method_fixed = {k: v for k, v in fixed.items() if k in known}  # e.g. no statistics for fine-tuning
    mine: list[dict[str, Any]] = []

    def run(settings: Sequence[Mapping[str, Any]]) -> None:
        for setting in tqdm(settings, desc=f"{method} grid", unit="setting", leave=False):
            prepare(lm, method, **method_fixed, **setting)
            row = {
                "method": method,
                **dict(setting),
                **score_setting(lm, requests, method, setting, log, **method_fixed),
            }
            mine.append(row)
            if on_result is not None:
                on_result(row)

    if grid is not None:
        run(grid)
    else:
        run(default_grid(lm, method))
        grid = default_grid(lm, method, mine)
        run(grid[len(mine) :])  # the second stage, if the method has one
    rows += mine
    best = best_setting(method, mine, grid)
    return {k: best[k] for k in grid[0]}


def sweep_table(method: str, rows: Sequence[Mapping[str, Any]], grid: Sequence[Mapping[str, Any]]) -> str:
    """A compact Markdown view of one method's sweep: a row per layer choice, a column per λ (MEMIT, PMET), per
    learning rate (fine-tuning, T-Patcher), per threshold (KN) or per δ decay (ROME), or one Score column. A cell
    is the Score, the best over any remaining setting (MEMIT's and PMET's δ decay, KN's steps and edit factor: a
    line under the table says how often they changed the Score); – where not run; the best setting of a complete
    grid in bold."""
    mine = {setting_key(method, {k: r[k] for k in grid[0] if k in r}): r for r in rows if r["method"] == method}
    column = next((k for k in ("mom2_update_weight", "lr", "threshold", "weight_decay") if k in grid[0]), None)
    layer_choices = list(dict.fromkeys(tuple(s["layers"]) for s in grid))
    columns = list(dict.fromkeys(s[column] for s in grid)) if column else [None]
    complete = all(setting_key(method, s) in mine for s in grid)
    best = best_setting(method, list(mine.values()), grid) if complete else None
    header = {"mom2_update_weight": "λ", "lr": "lr", "threshold": "threshold", "weight_decay": "δ decay"}.get(
        column or "", ""
    )
    lines = [
        "| layers | " + " | ".join(f"{header} {c:g}" if column else "Score" for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    differ = pairs = 0
    for layers in layer_choices:
        cells = []
        for c in columns:
            scored = [
                r
                for s in grid
                if tuple(s["layers"]) == layers
                and (column is None or s[column] == c)
                and (r := mine.get(setting_key(method, s))) is not None
            ]
            if len(scored) > 1:
                pairs += 1
                differ += len({round(r["score"], 6) for r in scored}) > 1
            top = max(scored, key=lambda r: r["score"], default=None)
            text = "–" if top is None else f"{top['score']:.1f}"
            cells.append(f"**{text}**" if best is not None and any(r is best for r in scored) else text)
        lines.append(f"| {layers[0]}–{layers[-1]} | " if len(layers) > 1 else f"| {layers[0]} | ")
        lines[-1] += " | ".join(cells) + " |"
    if pairs:
        others = [k for k in grid[0] if k not in ("layers", column)]
        what = "δ decay 0.5 vs 1e-3" if others == ["weight_decay"] else f"the other settings ({', '.join(others)})"
        lines.append(f"\n{what} changed the Score in {differ} of {pairs} cells (the better one shown).")
    return "\n".join(lines)
