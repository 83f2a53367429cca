"""FT-L side by side: the reference framework's loop (ROME `baselines/ft`, EasyEdit FT-L) vs kvedit's `ft-l`.

Both train one layer's down_proj with Adam (lr 5e-4, ≤ 25 steps, stop below a loss of 1e-2) on the first
known CounterFact cases; a fact counts as flipped when NLL(new) < NLL(true) on the rewrite prompt.
The reference loop is written out here from its description (prompt-last loss: every target token scored at
the prompt's last position, averaged; no step below 1e-2; a clamp only when norm_constraint is a number).
Rows: the reference without the constraint; kvedit `ft-l` with `norm_constraint=0` (off); kvedit `ft-l` as
the preset is (±5e-4 constraint), which is what `norm_constraint=None` gave before it could be switched off.

Usage: python benchmarks/ft_l_reference.py [--n 6] [--layer 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kvedit import edit, load_model
from kvedit.data.loaders import load_requests
from kvedit.evaluation import target_nll
from kvedit.evaluation.known import known_filter

DATA = "../shared/data/editing/counterfact/counterfact-edit-1k.json"


def flipped(lm, request) -> bool:
    nll_new, nll_true = target_nll(lm, [request.rewrite_prompt] * 2, [request.target_new, request.target_true])
    return bool(nll_new < nll_true)


def reference_ft_l(lm, request, layer: int, lr: float = 5e-4, steps: int = 25) -> tuple[bool, int, float]:
    """(flipped, optimiser steps, seconds) of the reference loop, unconstrained; weights restored after."""
    weight = lm.module(lm.values_path(layer)).weight
    original = weight.detach().clone()
    lm.model.requires_grad_(False)
    weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr, weight_decay=0.0)
    prompt = lm.tokenizer([request.rewrite_prompt], return_tensors="pt")
    target = lm.tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    done, start = 0, time.perf_counter()
    for _ in range(steps):
        loss = -F.log_softmax(lm.model(**prompt).logits[0, -1].float(), -1)[target].mean()
        if loss.item() < 1e-2:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += 1
    seconds = time.perf_counter() - start
    weight.requires_grad_(False)
    weight.grad = None
    result = flipped(lm, request)
    with torch.no_grad():
        weight.copy_(original)
    return result, done, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()

    lm = load_model(args.model)
    candidates = load_requests(args.data, limit=20 * args.n)
    cases = [r for r, known in zip(candidates, known_filter(lm, candidates)) if known][: args.n]
    print(f"{lm.name}: first {len(cases)} known cases, layer {args.layer} down_proj, Adam lr 5e-4, ≤ 25 steps")
    rows = {
        "reference FT-L (no constraint)": [],
        "kvedit ft-l, norm_constraint=0": [],
        "kvedit ft-l preset (±5e-4)": [],
    }
    for request in cases:
        rows["reference FT-L (no constraint)"].append(reference_ft_l(lm, request, args.layer))
        for label, constraint in (("kvedit ft-l, norm_constraint=0", 0.0), ("kvedit ft-l preset (±5e-4)", None)):
            delta = edit(lm, request, "ft-values", preset="ft-l", layers=(args.layer,), norm_constraint=constraint)
            result = delta.metadata["result"]
            rows[label].append((flipped(lm, request), result["steps"], result["time_s"]))
            delta.revert(lm)
        print(
            f"case {request.case_id}: "
            + ", ".join(
                f"{label}: {'flipped' if r[-1][0] else 'kept'} ({r[-1][1]} steps)" for label, r in rows.items()
            ),
            flush=True,
        )
    print(f"{'run':<34} {'flipped':>8} {'steps':>6} {'s/step':>7}")
    for label, results in rows.items():
        steps = sum(r[1] for r in results)
        per_step = sum(r[2] for r in results) / max(1, steps)
        print(
            f"{label:<34} {sum(r[0] for r in results):>4} / {len(results):<2} {steps / len(results):>6.1f} "
            f"{per_step:>7.3f}"
        )


if __name__ == "__main__":
    main()
