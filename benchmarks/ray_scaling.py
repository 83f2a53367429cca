"""Scaling of `kvedit bench --ray`: one process vs Ray with 1 and 2 workers, on the same cases.

Prints the wall time of each (statistics are prepared first, untimed; the unedited pass, done by the
driver in every path, is inside the time), the speed-up, and the distributed path's overhead per case against one process (the 1-worker run minus the
one-process run, divided by the cases). Each configuration writes its own folder under --out.
Usage: python benchmarks/ray_scaling.py [--n 20] [--methods ft-keys,memit] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from kvedit import load_model
from kvedit.bench.config import BenchConfig
from kvedit.bench.harness import Bench
from kvedit.bench.ray import RaySettings

DATASET = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "editing" / "counterfact" / "counterfact-edit-1k.json"
)


def timed_run(config: BenchConfig, out: Path, ray: RaySettings | None) -> float:
    """Wall time of a fresh run into `out`, statistics prepared (or loaded) beforehand."""
    shutil.rmtree(out, ignore_errors=True)
    lm = load_model()
    bench = Bench(lm, config, out, progress=False)  # the known-fact filter runs here, untimed
    for spec in bench.specs:
        bench.runner.prepare(spec)  # statistics and templates: computed once, then from the cache
    start = time.perf_counter()
    Bench(lm, config, out, progress=False).run(ray=ray)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DATASET))
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--methods", default="ft-keys,memit")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--stats", default="self", help="statistics corpus for memit (default: self)")
    parser.add_argument("--out", type=Path, default=Path("runs/ray_scaling"))
    args = parser.parse_args()

    config = BenchConfig(
        dataset=args.dataset, methods=tuple(args.methods.split(",")), n=args.n, known_only=True, stats_source=args.stats
    )
    results = {"one process": timed_run(config, args.out / "local", None)}
    for workers in (int(w) for w in args.workers.split(",")):
        results[f"ray, {workers} worker(s)"] = timed_run(
            config, args.out / f"ray{workers}", RaySettings(workers=workers)
        )
    base = results["one process"]
    edits = args.n * len(config.methods)
    print(f"{edits} edits ({args.methods} on {args.n} known CounterFact cases), bundled model")
    print(f"{'configuration':<22} {'wall time (s)':>14} {'speed-up':>9} {'s per edit':>11}")
    for name, seconds in results.items():
        print(f"{name:<22} {seconds:>14.1f} {base / seconds:>8.2f}x {seconds / edits:>11.2f}")
    if "ray, 1 worker(s)" in results:
        overhead = (results["ray, 1 worker(s)"] - base) / edits
        print(
            f"overhead of the distributed path: {overhead:+.2f} s per edit (1 worker vs one process; "
            "includes starting Ray and loading the model in the worker)"
        )


if __name__ == "__main__":
    main()
