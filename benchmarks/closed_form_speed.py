"""Key-statistics throughput and ROME / MEMIT / PMET wall time on the bundled model.

Prints: tokens/s for all needed layers in one pass vs one pass per layer; median edit time for
1 request (ROME, MEMIT, PMET) and for batches of 10 and 100 (MEMIT, PMET) with cached
statistics; peak memory. Targets (issue 3): one edit <= 3 s median, 100 MEMIT requests <= 120 s.
Usage: python benchmarks/closed_form_speed.py [--stats-tokens 20000] [--single 5] [--batches 10,100]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

from kvedit import edit, load_model
from kvedit.data.loaders import load_requests
from kvedit.editing.stats import key_statistics

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", default=str(SHARED / "corpus/wikitext-2/valid.txt"))
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--single", type=int, default=5, help="single edits timed per method")
    parser.add_argument("--batches", default="10,100")
    args = parser.parse_args()
    lm = load_model()
    layers = [3, 4, 5, 6, 7]

    start = time.perf_counter()
    key_statistics(lm, layers, args.stats, args.stats_tokens, use_cache=False, progress=False)
    one_pass = time.perf_counter() - start
    start = time.perf_counter()
    for layer in layers:
        key_statistics(lm, [layer], args.stats, args.stats_tokens, use_cache=False, progress=False)
    per_layer = time.perf_counter() - start
    print(f"statistics, {len(layers)} layers x {args.stats_tokens} tokens: one pass {one_pass:.1f} s "
          f"({args.stats_tokens / one_pass:.0f} tok/s), one pass per layer {per_layer:.1f} s "
          f"({args.stats_tokens / per_layer:.0f} tok/s)")
    key_statistics(lm, layers, args.stats, args.stats_tokens, progress=False)  # fill the cache

    requests = load_requests(SHARED / "editing/counterfact/counterfact-edit-1k.json", limit=200)
    common = dict(stats_source=args.stats, stats_tokens=args.stats_tokens)
    for method in ("rome", "memit", "pmet"):
        times, steps = [], []
        for request in requests[: args.single]:
            t0 = time.perf_counter()
            delta = edit(lm, request, method, **common)
            times.append(time.perf_counter() - t0)
            steps.append(delta.metadata["result"]["steps"])
            delta.revert(lm)
        print(f"{method:<6} 1 request: median {statistics.median(times):.2f} s, mean steps {statistics.mean(steps):.1f}")
    for size in (int(x) for x in args.batches.split(",") if x):
        for method in ("memit", "pmet"):
            t0 = time.perf_counter()
            delta = edit(lm, requests[:size], method, **common)
            elapsed = time.perf_counter() - t0
            delta.revert(lm)
            print(f"{method:<6} {size} requests at once: {elapsed:.1f} s ({elapsed / size:.2f} s/request)")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
