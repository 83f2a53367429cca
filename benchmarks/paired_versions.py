"""Paired comparison of two `kvedit bench` folders over the same cases (e.g. the code before and after a speed-up).

For every run present in both (ft-keys, rome, memit x100, …) and each success metric: the mean per-case
difference after − before (× 100), its 95 % bootstrap interval and the sign-test p. The acceptance rule of
issue 10: no drop, i.e. sign test p ≥ 0.05 and the mean change ≥ −1 point. Also prints each side's median edit time.
`--pair rome=rome-fast` compares a run with a differently named one (e.g. a labelled variant in another folder).
Usage: python benchmarks/paired_versions.py BEFORE_DIR... --after AFTER_DIR... [--pair OLD=NEW ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kvedit.evaluation.summary import compare_runs
from kvedit.evaluation.suites import SUITES

METRICS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def read_cases(folder: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for line in (folder / "cases.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs.setdefault(record["run"], []).append(record)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, nargs="+", help="bench folder(s) of the old code")
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="bench folder(s) of the new code")
    parser.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="compare before-run OLD with after-run NEW (repeatable)",
    )
    args = parser.parse_args()
    before = {k: v for folder in args.before for k, v in read_cases(folder).items()}
    after = {k: v for folder in args.after for k, v in read_cases(folder).items()}
    for pair in args.pair:
        old, sep, new = pair.partition("=")
        if not sep or old not in before or new not in after:
            parser.error(
                f"--pair {pair!r}: expected OLD=NEW with OLD a run of {sorted(before)} and NEW a run of {sorted(after)}"
            )
        before[f"{old}→{new}"], after[f"{old}→{new}"] = before[old], after[new]
    suite = SUITES["counterfact"]
    print(
        f"{'run':<20} {'metric':<22} {'cases':>5} {'Δ mean':>7} {'95 % interval':>16} {'sign p':>7} {'ok':>3}"
        f"   {'time before':>11} {'time after':>10}"
    )
    for run in [r for r in before if r in after]:
        result = compare_runs({"after": after[run], "before": before[run]}, suite)
        times = [statistics.median([r.get("time_s", 0.0) for r in side[run]]) for side in (before, after)]
        for c in (c for c in result if c["metric"] in METRICS):
            ok = (c["sign_test_p"] is None or c["sign_test_p"] >= 0.05) and c["mean_difference"] >= -1.0
            lo, hi = c["ci"]
            print(
                f"{run:<20} {c['metric']:<22} {c['count']:>5} {c['mean_difference']:>7.2f} "
                f"{f'[{lo:.2f}, {hi:.2f}]':>16} {c['sign_test_p'] if c['sign_test_p'] is not None else '–':>7} "
                f"{'yes' if ok else 'NO':>3}   {times[0]:>11.2f} {times[1]:>10.2f}"
            )


if __name__ == "__main__":
    main()
