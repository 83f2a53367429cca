"""Single-edit wall time, steps and peak memory of fine-tuning keys vs values on the bundled model.

Target (issue 2): a single FT-on-keys edit in <= 1.0 s median on 2 CPU cores.
Usage: python benchmarks/ft_edit_speed.py [--n 20] [--methods ft-keys,ft-values] [--preset default]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from kvedit import edit, load_model
from kvedit.data.demo_facts import demo_requests


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="number of demo facts to edit (one at a time)")
    parser.add_argument("--methods", default="ft-keys,ft-values")
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()

    start = time.perf_counter()
    lm = load_model()
    print(
        f"model {lm.name}: loaded in {time.perf_counter() - start:.2f} s, torch threads {torch.get_num_threads()}, "
        f"peak RSS {peak_rss_mb():.0f} MB"
    )
    requests = demo_requests()[: args.n]
    edit(lm, requests[0], "ft-keys").revert(lm)  # warm-up (first backward allocates)
    print(f"{'method':<12} {'preset':<8} {'median s':>9} {'mean s':>7} {'p90 s':>6} {'steps':>6} {'s/step':>7}")
    for method in args.methods.split(","):
        times, steps = [], []
        for request in requests:
            t0 = time.perf_counter()
            delta = edit(lm, request, method, preset=args.preset)
            times.append(time.perf_counter() - t0)
            steps.append(delta.metadata["result"]["steps"])
            delta.revert(lm)
        per_step = sum(times) / max(1, sum(steps))
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(
            f"{method:<12} {args.preset:<8} {statistics.median(times):>9.3f} {statistics.mean(times):>7.3f} "
            f"{p90:>6.3f} {statistics.mean(steps):>6.2f} {per_step:>7.3f}"
        )
    print(f"peak RSS over the run: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
