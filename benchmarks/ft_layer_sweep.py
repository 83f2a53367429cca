"""Sweep the edit layer (and optionally presets / learning rates) for FT on keys vs values.

Every demo fact is edited alone, scored and reverted by the bench runner (one resumable folder per
preset and learning rate, a layer sweep inside it); prints each folder's table. This is how the bundled
model's default layer and the default preset were chosen.
Usage: python benchmarks/ft_layer_sweep.py [--layers 0,3,6,...] [--n 44] [--presets default,qiu2024]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvedit import load_model
from kvedit.bench.config import BenchConfig
from kvedit.bench.harness import Bench
from kvedit.data.demo_facts import demo_facts_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,1,3,5,8,12,16,20,25")
    parser.add_argument("--methods", default="ft-keys,ft-values")
    parser.add_argument("--presets", default="default")
    parser.add_argument("--lrs", default="", help="comma-separated learning rates to try (default: the preset's)")
    parser.add_argument("--n", type=int, default=None, help="first N demo facts (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/ft_layer_sweep"))
    args = parser.parse_args()

    lm = load_model()
    lrs = [float(x) for x in args.lrs.split(",") if x] or [None]
    for preset in args.presets.split(","):
        for lr in lrs:
            extra = {"preset": preset} | ({"lr": lr} if lr else {})
            config = BenchConfig(
                dataset=str(demo_facts_path()),
                methods=tuple(args.methods.split(",")),
                n=args.n,
                layers=tuple(int(x) for x in args.layers.split(",")),
                extra=extra,
            )
            folder = args.out / (preset + (f"-lr{lr:g}" if lr else ""))
            Bench(lm, config, folder).run()
            print((folder / "table.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
