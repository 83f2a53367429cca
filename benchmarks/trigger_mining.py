"""Trigger mining for every layer and key vs a plain forward pass over the same tokens (the floor).

    .venv/bin/python benchmarks/trigger_mining.py [--tokens 100000] [--corpus PATH] [--threads 2]
        [--batch-size 512] [--batch-tokens 2048] [--skip-full-forward]

The corpus is tokenised into the batches mining uses; then, batch by batch, the same batch goes through a plain
forward (the model's full forward, with logits), a forward without the unembedding (all layers, no logits: the
stricter floor) and `TriggerMiner.add` (forward up to the last layer's coefficients + the running top-k of every
layer), each timed. Interleaving them batch by batch means all three see the same machine load, so the ratios
hold even on a shared machine; the 1-min load average is sampled at every batch and printed. Both forwards skip
the KV cache. Target: mining ≤ 1.5 × the forward and ≤ 3 min for 100k tokens on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from kvedit import load_model
from kvedit.analysis.corpus import token_batches
from kvedit.analysis.triggers import TriggerMiner

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "wikitext-2" / "valid.txt"


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--corpus", default=str(WIKITEXT))
    p.add_argument("--batch-size", type=int, default=512, help="sentences per forward pass at most")
    p.add_argument(
        "--batch-tokens", type=int, default=2048, help="padded tokens per forward pass at most (0: no limit)"
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-full-forward", action="store_true", help="time only the forward without logits")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_tokens = args.batch_tokens or None
    lm = load_model()
    print(
        f"{lm.name}: {lm.num_layers} layers; {args.tokens} tokens of {args.corpus}; batches of ≤ {args.batch_size} "
        f"sentences and ≤ {batch_tokens} tokens, sentences of ≤ {args.max_length} tokens; "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    start = time.perf_counter()
    batches = list(
        token_batches(lm, args.corpus, args.tokens, args.max_length, args.batch_size, batch_tokens=batch_tokens)
    )
    t_tok = time.perf_counter() - start
    counted = sum(b.num_tokens for b, _ in batches)
    padded = sum(b.input_ids.numel() for b, _ in batches)
    print(
        f"counted tokens {counted} ({padded} with padding) in {len(batches)} batches; tokenising {t_tok:.1f} s",
        flush=True,
    )

    t_full = t_base = t_mine = 0.0
    loads = []
    miner = TriggerMiner(lm, k=args.k, stride=args.max_length)
    with torch.inference_mode():
        for batch, ids in batches:
            loads.append(os.getloadavg()[0])
            inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            if not args.skip_full_forward:
                t_full += timed(lm.model, **inputs)
            t_base += timed(lm.model.base_model, **inputs)
            t_mine += timed(miner.add, batch, ids)
        t_result = timed(miner.result)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mining = t_tok + t_mine + t_result
    print(f"1-min load average during the run: {min(loads):.2f}–{max(loads):.2f} (mean {sum(loads) / len(loads):.2f})")
    print(f"tokenising                        {t_tok:7.1f} s")
    if not args.skip_full_forward:
        print(f"plain forward (with logits)       {t_full:7.1f} s  ({counted / t_full:,.0f} tok/s)")
    print(f"forward without logits            {t_base:7.1f} s  ({counted / t_base:,.0f} tok/s)")
    print(
        f"mining, all {lm.num_layers} layers × {miner.tops[0].d} memories "
        f"{mining:7.1f} s  ({counted / mining:,.0f} tok/s; tokenising + passes + {t_result:.1f} s to collect)"
    )
    if not args.skip_full_forward:
        print(f"  = {mining / (t_tok + t_full):.2f} × (tokenising + plain forward)")
    print(f"  = {mining / (t_tok + t_base):.2f} × (tokenising + forward without logits)")
    print(f"running top-k: {args.k} × d_ff scores + codes per layer; peak RSS {rss:,.0f} MB")


if __name__ == "__main__":
    main()
