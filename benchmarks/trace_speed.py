"""Causal tracing time per fact: the current `trace_fact` against an earlier version of it, interleaved.

The earlier version is read from git (`--before`, default the commit before the KV-cache / grouped restorations:
every (kind, layer) batch ran all tokens from the prompt's start), imported beside the current one, and both trace
the same known CounterFact facts (the bundled model's top token is the true object) in alternating order, so a busy
machine slows both alike. Prints per fact the CPU time (process time: with one thread it compares versions fairly
on a shared machine) and wall time of each, their ratio, and the largest score difference between the two
(they must agree to 1e-5).
Usage: OMP_NUM_THREADS=1 python benchmarks/trace_speed.py [--n 3] [--threads 1] [--before <commit>] [--skip-before]
       [--subject-from 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvedit import load_model
from kvedit.analysis import causal_trace
from kvedit.data.loaders import load_requests
from old_code import module_at

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BEFORE = "6468ab7"  # causal_trace.py as first committed (83e89b5), unchanged up to this commit


def timed(fn, *args, **kwargs):
    """(result, CPU seconds, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(SHARED / "editing/counterfact/counterfact-edit-1k.json"))
    parser.add_argument("--n", type=int, default=3, help="known facts to trace")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=BEFORE, help="git revision of the earlier causal_trace.py")
    parser.add_argument("--skip-before", action="store_true", help="time the current version only")
    parser.add_argument("--model", default=None, help="model (default: the bundled SmolLM2)")
    parser.add_argument(
        "--subject-from",
        type=int,
        default=0,
        help="only facts whose subject starts at this token or later (the KV cache then skips "
        "the tokens before it as well)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    requests = load_requests(args.dataset)
    nu = causal_trace.embedding_noise_scale(lm, [r.subject for r in requests])
    before = None if args.skip_before else module_at(args.before, "kvedit.analysis.causal_trace")
    print(f"{lm.name}: {lm.num_layers} layers, {args.threads} thread(s), ν = {nu:.4f}; before = {args.before}")
    print(
        "| fact | tokens | subject | before CPU s | after CPU s | CPU ratio | before wall s | after wall s "
        "| max |Δscore| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
    done = 0
    for r in requests:
        if done == args.n:
            break
        ids, span = causal_trace.subject_token_range(lm, r.rewrite_prompt, r.subject)
        if span[0] < args.subject_from:
            continue
        with torch.no_grad():
            top = int(lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1].argmax())
        if r.target_true is None or lm.tokenizer.decode([top]).strip() != r.target_true.strip():
            continue
        runs = {"after": causal_trace} if before is None else {"before": before, "after": causal_trace}
        order = list(runs) if done % 2 == 0 else list(runs)[::-1]  # alternate which version goes first
        results = {}
        for key in order:
            fact, cpu, wall = timed(runs[key].trace_fact, lm, r.rewrite_prompt, r.subject, nu)
            results[key] = fact
            totals[key][0] += cpu
            totals[key][1] += wall
            results[key + "_t"] = (cpu, wall)
        a_cpu, a_wall = results["after_t"]
        if before is None:
            b_cpu = b_wall = ratio = diff = float("nan")
        else:
            b_cpu, b_wall = results["before_t"]
            ratio = b_cpu / a_cpu
            diff = max(
                float((results["before"].scores[k] - results["after"].scores[k]).abs().max())
                for k in results["after"].scores
            )
        print(
            f"| {r.case_id} | {len(ids)} | {span[0]}–{span[1]} | {b_cpu:.1f} | {a_cpu:.1f} | {ratio:.2f} "
            f"| {b_wall:.1f} | {a_wall:.1f} | {diff:.1e} |",
            flush=True,
        )
        done += 1
    if done:
        b, a = totals["before"], totals["after"]
        ratio = b[0] / a[0] if before is not None else float("nan")
        print(
            f"\nper fact: before {b[0] / done:.1f} s CPU ({b[1] / done:.1f} s wall), after {a[0] / done:.1f} s CPU "
            f"({a[1] / done:.1f} s wall); before/after CPU ratio {ratio:.2f} over {done} facts"
        )


if __name__ == "__main__":
    main()
