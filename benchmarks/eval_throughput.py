"""Evaluation throughput on the bundled model: CounterFact probability metrics (efficacy, paraphrase,
neighborhood) in cases per second, batched prompts vs one prompt at a time.

Target (issue 4): >= 2 cases/s batched. Usage: python benchmarks/eval_throughput.py [--n 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvedit import counterfact_case_metrics, load_model
from kvedit.data.loaders import load_requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cases_per_second(lm, cases, batch_size: int) -> tuple[float, list[dict]]:
    counterfact_case_metrics(lm, cases[:2], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    metrics = counterfact_case_metrics(lm, cases, batch_size=batch_size)
    return len(cases) / (time.perf_counter() - start), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "editing/counterfact/counterfact-edit-1k.json"))
    parser.add_argument("--n", type=int, default=64, help="cases to score")
    parser.add_argument("--batch", type=int, default=32, help="prompts per forward pass when batched")
    args = parser.parse_args()
    lm = load_model()
    cases = load_requests(args.data, limit=args.n)
    prompts = sum(2 * (1 + len(c.paraphrase_prompts) + len(c.neighborhood_prompts)) for c in cases)
    batched, a = cases_per_second(lm, cases, args.batch)
    single, b = cases_per_second(lm, cases, 1)
    same = all(abs(x[k] - y[k]) < 1e-9 for x, y in zip(a, b) for k in x if k.endswith("_success"))
    print(f"{len(cases)} cases, {prompts} scored (prompt, target) pairs")
    print(
        f"batched ({args.batch} per pass): {batched:.2f} cases/s; one at a time: {single:.2f} cases/s; "
        f"speed-up {batched / single:.1f}x; identical success metrics: {same}"
    )
    print(f"target >= 2 cases/s batched: {'met' if batched >= 2 else 'not met'}")


if __name__ == "__main__":
    main()
