"""Editing table on CounterFact cases the unedited bundled model gets right (issue 3's protocol).

Each method edits the cases one at a time (edit, score, revert); `--batch-methods` also edit all
cases at once (MEMIT/PMET). Key statistics come from --stats (default: WikiText-2 from ../shared).
Usage: python benchmarks/counterfact_table.py [--n 100] [--methods ft-keys,ft-values,rome,memit,pmet,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvedit import counterfact_case_metrics, edit, load_model, summarize_counterfact
from kvedit.data.loaders import load_requests
from kvedit.demo import format_table, run_edits
from kvedit.evaluation import target_nll

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def known_cases(lm, requests, n):
    """The first `n` requests whose rewrite prompt the unedited model answers with target_true."""
    prompts = [r.rewrite_prompt for r in requests]
    new = target_nll(lm, prompts, [r.target_new for r in requests])
    true = target_nll(lm, prompts, [r.target_true for r in requests])
    kept = [r for r, a, b in zip(requests, new, true) if b < a]
    return kept[:n], len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "editing/counterfact/counterfact-edit-1k.json"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--methods", default="ft-keys,ft-values,rome,memit,pmet,pmet-no-attn-delta,pmet-update-attn,pmet-even-spread")
    parser.add_argument("--batch-methods", default="memit,pmet")
    parser.add_argument("--stats", default=str(SHARED / "corpus/wikitext-2/valid.txt"))
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("runs/counterfact_table"))
    args = parser.parse_args()

    lm = load_model()
    requests = load_requests(args.data)
    cases, n_known = known_cases(lm, requests, args.n)
    print(f"{n_known} of {len(requests)} cases known to the unedited model; using the first {len(cases)}")
    args.out.mkdir(parents=True, exist_ok=True)
    stats = dict(stats_source=args.stats, stats_tokens=args.stats_tokens)
    summaries = {"unedited": summarize_counterfact(counterfact_case_metrics(lm, cases)) | {"time_per_edit_s": None}}
    for method in [m for m in args.methods.split(",") if m]:
        extra = {} if method.startswith("ft-") else stats
        summaries[f"{method} (1 at a time)"] = run_edits(lm, cases, method, args.out / f"{method}.jsonl", **extra)
        print(format_table(summaries), flush=True)
    for method in [m for m in args.batch_methods.split(",") if m]:
        start = time.perf_counter()
        delta = edit(lm, cases, method, **stats)
        elapsed = time.perf_counter() - start
        summary = summarize_counterfact(counterfact_case_metrics(lm, cases))
        delta.revert(lm)
        summaries[f"{method} ({len(cases)} at once)"] = summary | {"time_per_edit_s": elapsed / len(cases),
                                                                  "batch_time_s": elapsed}
        print(format_table(summaries), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2, default=str) + "\n")
    (args.out / "table.md").write_text(format_table(summaries, f"CounterFact, {len(cases)} known cases, {lm.name}"))


if __name__ == "__main__":
    main()
