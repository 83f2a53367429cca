"""Edit wall time of ROME / MEMIT / PMET / FT-keys on the bundled model, beside issue 10's starting figures.

Known CounterFact cases (the unedited model answers target_true), default settings (the preset's statistics,
prepared and cached before timing), one edit at a time: median over `--n` cases, mean optimisation steps
and seconds per step, and the median CPU time (process time: with OMP_NUM_THREADS=1 it compares code versions
fairly even on a busy machine); then `--batch` MEMIT edits in one call. Prints a table with the figures measured when
the issue was opened and its targets, and writes the per-case times as JSON with `--out`.
The labelled `-fast` variants are printed beside their method's figures and targets.
`--model gemma3-270m` times another model (the before/target columns are the bundled model's).
`--compute-dtypes float32,bfloat16` (the default where the CPU has bfloat16 matrix units) edits each case in every
compute precision in turn (interleaved, so the ratio is fair on a shared machine) and prints the per-case time ratio;
then the matmul peaks of this run and the achieved GFLOP/s of one target-optimisation step (compute_speed.py).
Usage: python benchmarks/closed_form_speed.py [--n 20] [--batch 100] [--methods rome,memit,pmet,ft-keys,rome-fast,memit-fast]
       [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from kvedit import edit, load_model
from kvedit.data.loaders import load_requests
from kvedit.editing import prepare
from kvedit.models.compute import bf16_support

from compute_speed import matmul_peak, section_flops
from kvedit.evaluation.known import known_filter

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: issue 10, as measured before the work (bundled model, 2 cores, cached statistics, known cases), and targets
BEFORE = {"rome": 15.0, "memit": 9.2, "pmet": 11.0, "ft-keys": 1.6, "memit x100": 451.0}
TARGET = {"rome": 3.0, "memit": 3.0, "pmet": 4.0, "ft-keys": 1.0, "memit x100": 120.0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED / "editing/counterfact/counterfact-edit-1k.json"))
    parser.add_argument("--n", type=int, default=20, help="known cases edited one at a time per method")
    parser.add_argument("--batch", type=int, default=100, help="MEMIT edits in one call (0 skips)")
    parser.add_argument("--methods", default="rome,memit,pmet,ft-keys,rome-fast,memit-fast")
    parser.add_argument("--model", default=None, help="model to time (default: the bundled SmolLM2)")
    parser.add_argument("--out", default=None, help="write per-case times and steps to this JSON file")
    parser.add_argument(
        "--compute-dtypes",
        default=None,
        help="compute precisions to interleave (default: float32,bfloat16 with bf16 matrix units, else float32)",
    )
    parser.add_argument("--force-bf16", action="store_true", help="time bfloat16 even without bf16 matrix units")
    parser.add_argument("--repeats", type=int, default=3, help="timings of the optimisation step (GFLOP/s)")
    parser.add_argument("--n-flops", type=int, default=8, help="facts in the step whose GFLOP/s is printed")
    args = parser.parse_args()
    units = bf16_support().units
    dtypes = (args.compute_dtypes or ("float32,bfloat16" if units else "float32")).split(",")
    if "bfloat16" in dtypes and not (units or args.force_bf16):
        parser.error(
            "this CPU has no bfloat16 matrix units: bfloat16 would be emulated (30-70x slower matmuls); "
            "add --force-bf16 to time it anyway"
        )

    lm = load_model(args.model)
    print(
        f"{lm.name}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    requests = load_requests(args.dataset, limit=max(args.n, args.batch) * 2)
    known = [r for r, ok in zip(requests, known_filter(lm, requests)) if ok][: max(args.n, args.batch)]
    results: dict[str, dict] = {}
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        prepare(lm, method)
        prepared = time.perf_counter() - t0
        runs = {dtype: ([], [], []) for dtype in dtypes}  # times, CPU times, steps
        for dtype in dtypes:
            lm.compute_dtype = dtype
            edit(lm, known[0], method).revert(lm)  # warm-up: first allocations, first backward (and the bf16 copy)
        for request in known[: args.n]:
            for dtype, (times, cpu, steps) in runs.items():  # interleaved: each case in every precision in turn
                lm.compute_dtype = dtype
                t0, c0 = time.perf_counter(), time.process_time()
                delta = edit(lm, request, method)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                steps.append(delta.metadata["result"]["steps"])
                delta.revert(lm)
        lm.compute_dtype = "float32"
        for dtype, (times, cpu, steps) in runs.items():
            name = method if dtype == "float32" else f"{method} {dtype}"
            results[name] = dict(times=times, cpu_times=cpu, steps=steps, prepare_s=prepared)
            per_step = sum(times) / max(1, sum(steps) + len(steps))  # steps counts from 0
            rows.append(
                (name, statistics.median(times), statistics.median(cpu), statistics.mean(steps), per_step, prepared)
            )
        if "bfloat16" in runs and "float32" in runs:
            ratios = [a / b for a, b in zip(runs["float32"][0], runs["bfloat16"][0])]
            results[method]["bf16_speedup"] = ratios
            print(
                f"{method}: bfloat16 is {statistics.median(ratios):.2f}x float32's speed per edit (median of "
                f"{len(ratios)} interleaved cases, spread {min(ratios):.2f}-{max(ratios):.2f})"
            )
    if args.batch:
        prepare(lm, "memit")
        t0, c0 = time.perf_counter(), time.process_time()
        delta = edit(lm, known[: args.batch], "memit")
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        delta.revert(lm)
        results[f"memit x{args.batch}"] = dict(seconds=elapsed, cpu_seconds=cpu_s)
        rows.append((f"memit x{args.batch}", elapsed, cpu_s, float("nan"), float("nan"), 0.0))

    print(f"\nknown CounterFact cases: {args.n} one at a time; load average now {os.getloadavg()[0]:.1f}")
    print(
        f"{'method':<12} {'median s':>9} {'CPU s':>7} {'steps':>6} {'s/step':>7} {'prepare s':>10} {'before s':>9} "
        f"{'target s':>9}"
    )
    for name, median, cpu_s, steps, per_step, prepared in rows:
        key = (
            "memit x100" if name.startswith("memit x") else name.split()[0].removesuffix("-fast")
        )  # -fast: same targets
        print(
            f"{name:<12} {median:>9.2f} {cpu_s:>7.2f} {steps:>6.1f} {per_step:>7.3f} {prepared:>10.1f} "
            f"{BEFORE.get(key, float('nan')):>9.1f} {TARGET.get(key, float('nan')):>9.1f}"
        )
    peaks = {
        name: matmul_peak(dtype, lm.d_model, lm.model.config.intermediate_size)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    print("matmul peak this run: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    for dtype in dtypes:
        lm.compute_dtype = dtype
        section_flops(lm, args, peaks)
    lm.compute_dtype = "float32"
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
