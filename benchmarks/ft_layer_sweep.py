"""Sweep the edit layer (and optionally presets / learning rates) for FT on keys vs values.

Every demo fact is edited alone, scored and reverted; prints one table row per (method, layer)
and writes the summaries to --out as JSON. This is how the bundled model's default layer and
the default preset were chosen.
Usage: python benchmarks/ft_layer_sweep.py [--layers 0,3,6,...] [--n 44] [--presets default,qiu2024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvedit import load_model
from kvedit.data.demo_facts import demo_requests
from kvedit.demo import format_table, run_edits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,1,3,5,8,12,16,20,25")
    parser.add_argument("--methods", default="ft-keys,ft-values")
    parser.add_argument("--presets", default="default")
    parser.add_argument("--lrs", default="", help="comma-separated learning rates to try (default: the preset's)")
    parser.add_argument("--n", type=int, default=None, help="first N demo facts (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/ft_layer_sweep.json"))
    args = parser.parse_args()

    lm = load_model()
    requests = demo_requests()[: args.n] if args.n else demo_requests()
    lrs = [float(x) for x in args.lrs.split(",") if x] or [None]
    results = {}
    for preset in args.presets.split(","):
        for lr in lrs:
            for layer in (int(x) for x in args.layers.split(",")):
                for method in args.methods.split(","):
                    name = f"{method} L{layer} {preset}" + (f" lr={lr:g}" if lr else "")
                    results[name] = run_edits(lm, requests, method, layers=(layer,), preset=preset, lr=lr)
                    s = results[name]
                    print(f"{name:<34} E {s['efficacy_success']:6.2f}  P {s['paraphrase_success']:6.2f}  "
                          f"S {s['neighborhood_success']:6.2f}  Score {s['score']:6.2f}  "
                          f"{s['time_per_edit_s']:.2f} s/edit  {s['steps_mean']:.1f} steps", flush=True)
    print()
    print(format_table(results, f"FT layer sweep on {lm.name}, {len(requests)} demo facts"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
