"""Issue 30's figures: matrix-multiply peak (float32, bfloat16), the target optimisation's achieved GFLOP/s against
it, one optimisation step per compute precision and attention implementation, and the per-fact cost of batched
target optimisation at N = 1, 10, 100 facts per call.

Everything compared is measured interleaved in one process (the machine is shared): configurations alternate, each
figure is a median over `--repeats`, and the ratios are printed beside the load average.

Sections (`--sections`, comma-separated):
  peak     matmul GFLOP/s on the model's shapes (rows × d_model @ d_model × d_ff and its transposes), f32 and bf16
  step     one forward+backward of a MEMIT target-optimisation pass (7 rows per fact), f32/bf16 × sdpa/eager
  flops    one optimisation step for `--n-flops` facts: FLOPs (torch.utils.flop_counter), seconds, GFLOP/s vs peak
  batch    optimize_targets at N = --sizes facts per call with each of --group-sizes: seconds per fact, peak RSS
  mining   trigger mining of --mine-tokens corpus tokens (every layer) in f32 and bf16: tok/s, and the share of
           memories whose top-1 example is the same (and whose bf16 top-1 is in the f32 top-k)
bf16 runs where the CPU has no bfloat16 matrix units only with --force-bf16 (they are 30-70x slower there).
Usage: OMP_NUM_THREADS=2 python benchmarks/compute_speed.py --sections peak,step,flops [--force-bf16]
       python benchmarks/compute_speed.py --sections batch --sizes 1,10,100 --group-sizes 8,32
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kvedit import load_model
from kvedit.data.loaders import load_requests
from kvedit.editing import make_settings
from kvedit.editing.context import MEMIT_TEMPLATES, context_templates
from kvedit.editing.targets import _Group, _request_rows, optimize_targets
from kvedit.models.compute import bf16_support, compute_view
from kvedit.models.tracing import Addition, Trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASET = SHARED / "editing/counterfact/counterfact-edit-1k.json"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, d_model: int, d_ff: int, rows: int = 512, repeats: int = 5) -> float:
    """Best GFLOP/s over `repeats` of the three matmuls of an FFN's forward/backward at `rows` rows."""
    a, w = torch.randn(rows, d_model, dtype=dtype), torch.randn(d_model, d_ff, dtype=dtype)
    g = torch.randn(rows, d_ff, dtype=dtype)
    flops = 3 * 2 * rows * d_model * d_ff

    def run() -> None:
        a @ w, g @ w.T, a.T @ g

    run()
    return max(flops / timed(run) / 1e9 for _ in range(repeats))


def cases(lm, n: int):
    from kvedit.evaluation.known import known_filter

    requests = load_requests(str(DATASET), limit=n * 3)
    return [r for r, ok in zip(requests, known_filter(lm, requests)) if ok][:n]


def memit_setup(lm):
    hp = make_settings(lm, "memit")
    return [("residual", max(hp.layers))], context_templates(lm, MEMIT_TEMPLATES), hp.target_options()


def one_step(lm, requests, sites, templates) -> Callable[[], None]:
    """A closure running one forward+backward pass of the target optimisation on `lm` (a compute view)."""
    contexts = [c for group in templates for c in group]
    items = [_request_rows(lm, r, contexts) for r in requests]
    group = _Group(lm, items, list(range(len(items))), min(layer for _, layer in sites))
    delta = torch.zeros(len(group.row_owner), lm.d_model, requires_grad=True)

    def step() -> None:
        add = {s: Addition(delta, group.at_lookup) for s in sites}
        with Trace(lm, add=add, positions=group.at_lookup):
            hidden = group.batch.forward_suffix()
        at = hidden[group.ctx_rows[:, None], group.rel_pos]
        logits = lm.unembed(torch.cat([at.flatten(0, 1), hidden[group.kl_index, 0]])).float()
        torch.log_softmax(logits, -1).mean().backward()

    return step


def section_step(lm, args) -> None:
    requests = cases(lm, 3)
    sites, templates, _ = memit_setup(lm)
    configs = [("float32", "sdpa"), ("float32", "eager")]
    if bf16_support().units or args.force_bf16:
        configs += [("bfloat16", "sdpa"), ("bfloat16", "eager")]
    steps = {}
    for dtype, attn in configs:
        lm.compute_dtype = dtype
        view = compute_view(lm, attn) if dtype != "float32" else lm
        if dtype == "float32":
            lm.model.set_attn_implementation(attn)
        steps[(dtype, attn)] = one_step(view, requests, sites, templates)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            if c[0] == "float32":
                lm.model.set_attn_implementation(c[1])
            times[c].append(timed(steps[c]))
    lm.model.set_attn_implementation("sdpa")
    lm.compute_dtype = "float32"
    base = statistics.median(times[("float32", "sdpa")])
    print(f"\none target-optimisation step, {len(requests)} facts × 7 rows (median of {args.repeats}, interleaved)")
    for c, t in times.items():
        print(
            f"  {c[0]:<9} {c[1]:<6} {statistics.median(t):7.3f} s  (spread {min(t):.3f}-{max(t):.3f})  "
            f"{base / statistics.median(t):5.2f}x vs float32 sdpa"
        )


def section_flops(lm, args, peaks: dict[str, float]) -> None:
    """FLOPs of one target-optimisation step (forward + backward, torch.utils.flop_counter) over its median time:
    the loop repeats this step, so this is the loop's achieved rate."""
    requests = cases(lm, args.n_flops)
    sites, templates, _ = memit_setup(lm)
    step = one_step(compute_view(lm), requests, sites, templates)  # the model the loop runs on in lm.compute_dtype
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = [timed(step) for _ in range(args.repeats)]
    t = statistics.median(seconds)
    rate = flops / t / 1e9
    print(
        f"\nMEMIT target-optimisation step ({lm.compute_dtype}), {len(requests)} facts × 7 rows: {flops / 1e9:.2f} GFLOP "
        f"in {t:.2f} s (spread {min(seconds):.2f}-{max(seconds):.2f}) = {rate:.1f} GFLOP/s; "
        + ", ".join(f"{100 * rate / p:.0f} % of the {d} matmul peak ({p:.1f})" for d, p in peaks.items())
    )


def section_batch(lm, args) -> None:
    sizes = [int(x) for x in args.sizes.split(",")]
    groups = [int(x) for x in args.group_sizes.split(",")]
    pool = cases(lm, max(sizes))
    sites, templates, opts = memit_setup(lm)
    print(f"\nbatched target optimisation (MEMIT's, {lm.compute_dtype}): seconds per fact, configurations interleaved")
    for n in sizes:
        times: dict[int, list[float]] = {g: [] for g in groups}
        for _ in range(args.repeats if n < 100 else 1):
            for g in groups:
                times[g].append(timed(lambda: optimize_targets(lm, pool[:n], sites, templates, opts, group_size=g)))
        print(
            f"  N={n:<4} "
            + "   ".join(
                f"group {g}: {statistics.median(t) / n:6.2f} s/fact (spread {min(t) / n:.2f}-{max(t) / n:.2f})"
                for g, t in times.items()
            )
            + f"   peak RSS so far {peak_rss_mb():.0f} MB"
        )


def section_mining(lm, args) -> None:
    from kvedit.analysis.triggers import mine_triggers

    found, seconds = {}, {"float32": [], "bfloat16": []}
    for _ in range(args.repeats if args.repeats < 3 else 2):
        for dtype in seconds:
            lm.compute_dtype = dtype
            start = time.perf_counter()
            found[dtype] = mine_triggers(lm, args.mine_source, k=10, max_tokens=args.mine_tokens, progress=False)
            seconds[dtype].append(time.perf_counter() - start)
    lm.compute_dtype = "float32"
    same = in_top = total = 0
    for layer in found["float32"].layers:
        a, b = found["float32"].codes[layer], found["bfloat16"].codes[layer]
        same += int((a[:, 0] == b[:, 0]).sum())
        in_top += int((b[:, :1] == a).any(1).sum())
        total += a.shape[0]
    rate = {d: args.mine_tokens / statistics.median(t) for d, t in seconds.items()}
    print(
        f"\ntrigger mining, {args.mine_tokens} tokens of {args.mine_source}, every layer, k=10 (median of {len(seconds['float32'])}):"
        f" float32 {rate['float32']:.0f} tok/s, bfloat16 {rate['bfloat16']:.0f} tok/s "
        f"({rate['bfloat16'] / rate['float32']:.2f}x); top-1 example the same for {100 * same / total:.2f} % of "
        f"{total} memories, bf16's top-1 in float32's top-10 for {100 * in_top / total:.2f} %"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="peak,step,flops")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-flops", type=int, default=8)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--group-sizes", default="8,32")
    parser.add_argument("--mine-tokens", type=int, default=4096)
    parser.add_argument(
        "--mine-source",
        default=str(SHARED / "corpus/wikitext-2"),
        help="mining corpus (a text file or folder; 'self' generates text, which dominates the time)",
    )
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even without bf16 matrix units")
    args = parser.parse_args()
    lm = load_model()
    support = bf16_support()
    print(
        f"{lm.name}: torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; "
        f"bf16 matrix units: {'yes' if support.units else 'no'} ({support.detail})"
    )
    sections = args.sections.split(",")
    peaks: dict[str, float] = {}
    if "peak" in sections or "flops" in sections:
        d_ff = lm.model.config.intermediate_size
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            peaks[name] = matmul_peak(dtype, lm.d_model, d_ff)
        print("matmul peak (rows 512, d_model × d_ff): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    if "step" in sections:
        section_step(lm, args)
    if "flops" in sections:
        section_flops(lm, args, peaks)
    if "batch" in sections:
        section_batch(lm, args)
    if "mining" in sections:
        section_mining(lm, args)
    print(f"peak RSS {peak_rss_mb():.0f} MB; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
