"""Knowledge-neuron attributions per prompt: the current `attributions` against an earlier version, interleaved.

The earlier version is read from git (`--before`, default the last commit whose `attributions` ran every token of
the prompt for each integration step; the current one runs the earlier tokens once, as a KV cache, and only the
last token per step). Both attribute the same known CounterFact facts' rewrite prompts to their true objects, in
alternating order, so a busy machine slows both alike. Prints per prompt the CPU and wall time of each, their
ratio and the largest difference between the two attribution tensors (relative to the largest attribution).
Usage: OMP_NUM_THREADS=1 python benchmarks/attribution_speed.py [--model gemma3-270m] [--n 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvedit import load_model
from kvedit.analysis import neurons
from kvedit.data.loaders import load_requests
from old_code import module_at

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BEFORE = "b91ba88"  # neurons.py with every token run per step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the bundled SmolLM2)")
    parser.add_argument("--dataset", default=str(SHARED / "editing/counterfact/counterfact-edit-1k.json"))
    parser.add_argument("--n", type=int, default=3, help="known facts")
    parser.add_argument("--steps", type=int, default=20, help="integration steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=BEFORE, help="git revision of the earlier neurons.py")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    versions = {"before": module_at(args.before, "kvedit.analysis.neurons"), "after": neurons}
    print(f"{lm.name}: {lm.num_layers} layers, {args.steps} steps, {args.threads} thread(s); before = {args.before}")
    print("| case | tokens | before CPU s | after CPU s | CPU ratio | before wall s | after wall s | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = {"before": 0.0, "after": 0.0}
    done = 0
    for r in load_requests(args.dataset):
        if done == args.n:
            break
        ids = lm.tokenizer(r.rewrite_prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        if r.target_true is None or lm.tokenizer.decode([top]).strip() != r.target_true.strip():
            continue
        out, times = {}, {}
        for key in list(versions) if done % 2 == 0 else list(versions)[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            out[key] = versions[key].attributions(lm, r.rewrite_prompt, r.target_true, args.steps)
            times[key] = (time.process_time() - cpu, time.perf_counter() - wall)
            totals[key] += times[key][0]
        diff = float((out["before"] - out["after"]).abs().max() / out["before"].abs().max())
        (b_cpu, b_wall), (a_cpu, a_wall) = times["before"], times["after"]
        print(
            f"| {r.case_id} | {ids.shape[1]} | {b_cpu:.1f} | {a_cpu:.1f} | {b_cpu / a_cpu:.2f} | {b_wall:.1f} "
            f"| {a_wall:.1f} | {diff:.1e} |",
            flush=True,
        )
        done += 1
    if done:
        b, a = totals["before"] / done, totals["after"] / done
        print(f"\nper prompt: before {b:.1f} s CPU, after {a:.1f} s CPU; ratio {b / a:.2f} over {done} facts")


if __name__ == "__main__":
    main()
