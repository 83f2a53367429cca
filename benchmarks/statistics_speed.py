"""First-use costs on the bundled model: key statistics from a text file, sampling the `self` corpus, and the
first closed-form edit on an empty cache (templates, sampling, statistics and C⁻¹ included).

Issue 10's targets: statistics for 5 layers × 73.5k text tokens ≤ 90 s (the reference framework: 368 s here);
self-sampling ≥ 1,000 tokens/s; the first ROME/MEMIT/PMET edit on a fresh cache ≤ 60 s. Each figure is measured
in a fresh, temporary cache (the converted model is reused), so nothing is read from earlier runs.
Usage: python benchmarks/statistics_speed.py [--text-tokens 73500] [--self-tokens 4096] [--method memit]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(SHARED / "corpus/wikitext-2/valid.txt"))
    parser.add_argument("--text-tokens", type=int, default=73_500)
    parser.add_argument("--self-tokens", type=int, default=4096, help="tokens sampled for the throughput figure")
    parser.add_argument("--method", default="memit", help="method of the first-edit figure (rome, memit or pmet)")
    args = parser.parse_args()

    from kvedit.models.cache import cache_dir

    models = cache_dir() / "models"
    fresh = Path(tempfile.mkdtemp(prefix="kvedit-fresh-cache-"))
    if models.is_dir():
        (fresh / "models").symlink_to(models)  # the converted model is not what is measured
    os.environ["KVEDIT_CACHE"] = str(fresh)
    try:
        from kvedit import EditRequest, edit, load_model
        from kvedit.editing.self_corpus import sample_block
        from kvedit.editing.stats import key_statistics

        lm = load_model()
        print(f"{lm.name}: {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
        start = time.perf_counter()
        key_statistics(lm, [3, 4, 5, 6, 7], args.text, args.text_tokens, use_cache=False, progress=False)
        elapsed = time.perf_counter() - start
        print(
            f"statistics, 5 layers x {args.text_tokens} text tokens: {elapsed:.1f} s "
            f"({args.text_tokens / elapsed:.0f} tok/s; target <= 90 s)"
        )

        rows = max(1, args.self_tokens // 256)
        start = time.perf_counter()
        ids, _ = sample_block(lm, 0, 0, rows, 256)
        elapsed = time.perf_counter() - start
        print(f"self sampling, {rows} rows x 256 tokens: {ids.numel() / elapsed:.0f} tok/s (target >= 1000)")

        request = EditRequest("{} is located in the city of", "The Eiffel Tower", target_new="Rome")
        start = time.perf_counter()
        edit(lm, request, args.method).revert(lm)
        print(f"first {args.method} edit on an empty cache: {time.perf_counter() - start:.1f} s (target <= 60 s)")
        start = time.perf_counter()
        edit(lm, request, args.method).revert(lm)
        print(f"second {args.method} edit (everything cached): {time.perf_counter() - start:.1f} s")
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


if __name__ == "__main__":
    main()
