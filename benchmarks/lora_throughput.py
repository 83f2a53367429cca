"""LoRA training throughput by target set against the floor: a plain forward + backward of the same batch.

For each target set: tokens/s of one kvedit training step (peft LoRA r 8 on the set's modules, dropout 0.1,
loss on the label tokens, AdamW step), and of the floor: the same batch and loss through the model without
an adapter, backward through every layer to the input embeddings (activation gradients only: the least any
adapter on all layers must compute; no optimiser). Floor and LoRA steps alternate, and the medians
are compared. Target (issue 11): LoRA within 1.3× of the floor.
Usage: python benchmarks/lora_throughput.py [--targets attn-qv,keys,values] [--batch-size 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kvedit import load_model
from kvedit.tuning.presets import preset
from kvedit.tuning.runner import classification_data
from kvedit.tuning.targets import attach_adapter, detach_adapter, parameter_counts, parse_targets
from kvedit.tuning.train import batch_loss, collate, training_sequences

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--targets", default="attn-qv,keys,values")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    data = classification_data(["cb", "boolq", "copa", "qnli"], SHARED / "tasks", 8, 1)
    config = preset("default", batch_size=args.batch_size)
    rows = training_sequences(lm, data.train, config)[: args.batch_size]
    batch = collate(rows, lm.tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    print(
        f"{lm.name}: batch {len(rows)} × ≤{batch['input_ids'].shape[1]} tokens ({tokens} real), "
        f"{torch.get_num_threads()} threads, {args.reps} alternating reps (medians)"
    )
    print("| target | trainable | floor tok/s | LoRA tok/s | LoRA / floor time |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.targets.split(","):
        targets = parse_targets(lm, spec)
        floor_s, lora_s = [], []
        for rep in range(args.reps + 1):  # the first rep warms up and is dropped
            for p in lm.model.parameters():
                p.requires_grad_(False)
            hook = lm.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
            began = time.perf_counter()
            loss, n = batch_loss(lm, batch)
            (loss / n).backward()
            elapsed = time.perf_counter() - began
            hook.remove()
            if rep:
                floor_s.append(elapsed)

            peft_model = attach_adapter(lm, targets, rank=8)
            peft_model.train()
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=config.lr)
            began = time.perf_counter()
            loss, n = batch_loss(lm, batch)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            trainable, total = parameter_counts(peft_model)
            lm.model = detach_adapter(peft_model)
            lm.model.eval()
            if rep:
                lora_s.append(elapsed)
        floor, lora = statistics.median(floor_s), statistics.median(lora_s)
        print(
            f"| {spec} | {trainable:,} ({100 * trainable / total:.3f} %) | {tokens / floor:.0f} | "
            f"{tokens / lora:.0f} | {lora / floor:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
