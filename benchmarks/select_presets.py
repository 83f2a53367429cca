"""Choose every editor's preset alike on a tuning split of known CounterFact cases (kvedit.bench.selection).

Writes to --out: split.json (the case ids of the tuning and report splits), grid.jsonl (one line per method and
setting, appended as each finishes), cases.jsonl (one line per finished tuning case and setting: a
killed run resumes inside the setting it was in), grid.md (every setting's scores), sweep.md (the same
Scores compact: a row per layer choice, a column per λ or δ decay) and
chosen.json (the best setting per method, as preset rows). The report split is never edited here. Settings that
differ only in λ share their target vectors (optimised once per case), so their "edit s" is the solve alone.
ROME, MEMIT and PMET search δ decay in a second stage (selection.default_grid): the best first-stage setting again
at decay 1e-3, run by the process that finds the first stage complete. Two processes may share one --out with
different --methods or shards (each appends its own lines); the tables are written from everything grid.jsonl
holds, every method in it, so run the script once more when both have finished (it also runs a second stage left
undone), or with --tables-only.
KN and T-Patcher (`--methods kn,t-patcher`) have one layer choice each, so --shard shares their grids out setting
by setting; grid.md puts the settings without a column of their own (threshold, steps, …) under "other".
--where KEY=VALUE (repeatable) keeps only the settings of each grid that have KEY = VALUE (methods whose grid has
no KEY keep theirs): a reduced grid where the full one costs too much, said in grid.md. The folder remembers it
(restrict.json), so later runs and --tables-only use the same grid; a different --where is refused.
Usage: python benchmarks/select_presets.py --out runs/select-smollm2 [--model gemma3-270m] [--n-tune 50]
       [--n-report 200] [--methods memit,pmet,rome,ft-keys,ft-values,kn,t-patcher] [--base-preset smollm2]
       [--shard 0/2] [--where memory_weight=5 --where max_neurons=5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvedit import load_model
from kvedit.bench.selection import (
    CaseLog,
    best_setting,
    default_grid,
    known_split,
    select,
    setting_key,
    setting_of,
    sweep_table,
)
from kvedit.data.jsonl import cut_torn_tail
from kvedit.data.loaders import load_requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


ALL_METHODS = ("memit", "pmet", "rome", "ft-keys", "ft-values", "kn", "t-patcher")  # the tables' order
TABLE_KEYS = ("layers", "mom2_update_weight", "weight_decay", "lr")  # grid.md's own columns; others go to "other"


def _key(row: dict) -> str:
    """The row's method and grid setting (whatever keys the method's grid has), as `setting_key` spells them."""
    return setting_key(row["method"], setting_of(row))


def _other(row: dict) -> str:
    """The setting's keys without a column of their own in grid.md, e.g. "threshold 0.2, max_steps 20"."""
    return (
        ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in setting_of(row).items()
            if k not in TABLE_KEYS
        )
        or "–"
    )


def _read_grid(path: Path) -> dict[str, dict]:
    """Finished settings by key (a line cut short by a kill is skipped)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[_key(row)] = row
    return done


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard: expected K/N such as 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard: K must be in 0..N-1, got {text!r}")
    return k, n


def shard_of(grid: list[dict], k: int, n: int) -> list[dict]:
    """The settings whose layer choice is the k-th, (k+n)-th, … distinct one of the grid; a grid with fewer layer
    choices than shards (KN, T-Patcher: one) is shared out setting by setting."""
    layer_choices = list(dict.fromkeys(tuple(s.get("layers", ())) for s in grid))
    if len(layer_choices) < n:
        return grid[k::n]
    return [s for s in grid if layer_choices.index(tuple(s.get("layers", ()))) % n == k]


def _where(items: list[str]) -> dict[str, float | str]:
    """{"memory_weight": 5.0} from ["memory_weight=5"] (numbers as floats, anything else as text)."""
    where: dict[str, float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--where: expected KEY=VALUE such as memory_weight=5, got {item!r}")
        try:
            where[key] = float(value)
        except ValueError:
            where[key] = value
    return where


def restricted(grid: list[dict], where: dict[str, float | str]) -> list[dict]:
    """The settings of `grid` that agree with `where` on every key they have."""
    return [s for s in grid if all(s[k] == v for k, v in where.items() if k in s)]


def _folder_where(out: Path, given: dict[str, float | str]) -> dict[str, float | str]:
    """The folder's grid restriction: `given` on first use (saved to restrict.json), else what it saved; a
    different one is refused, since the tables would mix two grids."""
    path = out / "restrict.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None and given and given != saved:
        raise SystemExit(f"--where {given} differs from the restriction {saved} this folder was made with")
    if saved is None and given:
        path.write_text(json.dumps(given, indent=1))
    return given or saved or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=str(SHARED / "editing/counterfact/counterfact-edit-1k.json"))
    parser.add_argument("--n-tune", type=int, default=50)
    parser.add_argument("--n-report", type=int, default=200)
    parser.add_argument("--methods", default="memit,pmet,rome,ft-keys,ft-values")
    parser.add_argument(
        "--shard",
        default="0/1",
        metavar="K/N",
        help="run only the K-th of N shares of each grid, split by layer choice (so λ sweeps keep "
        "reusing their targets): N processes with K = 0..N-1 cover the grid once",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="write grid.md and chosen.json from what grid.jsonl holds, without editing",
    )
    parser.add_argument(
        "--base-preset",
        default=None,
        help="preset row the closed-form editors start from when the model has none of its own "
        "(e.g. smollm2); the grid sets layers, λ and δ decay",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only the grid settings with KEY = VALUE (repeatable; e.g. memory_weight=5); saved in the folder",
    )
    args = parser.parse_args()
    shard, shards = _shard(args.shard)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    methods = args.methods.split(",")
    given = _where(args.where)
    unknown = set(given) - {k for m in methods for s in default_grid(lm, m) for k in s}
    if unknown:
        raise SystemExit(f"--where: no grid of {', '.join(methods)} has {', '.join(sorted(unknown))}")
    where = _folder_where(out, given)

    def grid_of(method: str, rows: list[dict]) -> list[dict]:
        return restricted(default_grid(lm, method, rows), where)

    if not args.tables_only:
        split = known_split(lm, load_requests(args.dataset), args.n_tune, args.n_report)
        (out / "split.json").write_text(
            json.dumps(
                {
                    "model": lm.name,
                    "dataset": args.dataset,
                    "base_preset": args.base_preset,
                    "tune": [r.case_id for r in split.tune],
                    "report": [r.case_id for r in split.report],
                },
                indent=1,
            )
        )
    path = out / "grid.jsonl"
    cut_torn_tail(path)

    def write(row: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps({**row, **({"layers": list(row["layers"])} if "layers" in row else {})}) + "\n")

    start = time.perf_counter()
    for _stage in range(0 if args.tables_only else 2):  # the δ-decay stage follows a complete first stage
        done = _read_grid(path)
        grids = {
            m: [s for s in shard_of(grid_of(m, list(done.values())), shard, shards) if setting_key(m, s) not in done]
            for m in methods
        }
        if any(grids.values()):
            select(
                lm,
                list(split.tune),
                [m for m in methods if grids[m]],
                grids,
                on_result=write,
                log=CaseLog(out / "cases.jsonl"),
                base_preset=args.base_preset,
            )
    rows = list(_read_grid(path).values())  # with what another process sharing --out has written
    # the tables cover every method the folder holds (a later run of other --methods keeps the earlier choices)
    shown = list(dict.fromkeys([*ALL_METHODS, *methods]))
    shown = [m for m in shown if m in methods or any(r["method"] == m for r in rows)]
    chosen = {}
    lines = [
        "| method | layers | λ | δ decay | lr | other | Efficacy | Paraphrase | Specificity | Score | edit s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for m in shown:
        grid = grid_of(m, rows)
        order = {setting_key(m, s): i for i, s in enumerate(grid)}
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: order.get(_key(r), len(order)))
        if not mine:
            continue
        best = best_setting(m, [r for r in mine if _key(r) in order] or mine, grid)  # off-grid rows never win
        complete = {_key(r) for r in mine} >= set(order)
        if complete:
            chosen[m] = setting_of(best)
        else:
            lines.append(f"| {m}: {len(mine)} of {len(grid)} settings so far, none chosen yet | | | | | | | | | | |")
        for r in mine:
            mark = " **(chosen)**" if r is best and complete else ""
            lines.append(
                f"| {m}{mark} | {r.get('layers', '–')} | {r.get('mom2_update_weight', '–')} | "
                f"{r.get('weight_decay', '–')} | {r.get('lr', '–')} | {_other(r)} | "
                f"{r['efficacy_success']:.1f} | {r['paraphrase_success']:.1f} "
                f"| {r['neighborhood_success']:.1f} | {r['score']:.1f} | {r['edit_s']:.2f} |"
            )
    lines += [
        "",
        "Success rates × 100 over the tuning split; Score their harmonic mean; edit s the median edit "
        "time (for a setting whose target vectors were reused from one that differs only in λ, the solve "
        "alone).",
        *(
            [
                f"Grid restricted to {', '.join(f'{k} = {v:g}' if isinstance(v, float) else f'{k} = {v}' for k, v in where.items())} (--where, restrict.json)."
            ]
            if where
            else []
        ),
    ]
    (out / "grid.md").write_text("\n".join(lines) + "\n")
    sweeps = [
        f"**{m}** (Score on the tuning split)\n\n{sweep_table(m, rows, grid_of(m, rows))}"
        for m in shown
        if any(r["method"] == m for r in rows)
    ]
    (out / "sweep.md").write_text("\n\n".join(sweeps) + "\n")
    (out / "chosen.json").write_text(json.dumps(chosen, indent=1))
    print("\n".join(lines))
    print(f"\nchosen: {json.dumps(chosen)}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
