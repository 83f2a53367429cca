"""Two kvedit processes on one machine: FT step time alone vs beside each other, before and after the fix.

Issue 28 item 6: `make demo` beside other torch processes slowed far beyond its share. Each variant starts P
worker processes that load the model and time a fixed workload, an FT edit's inner step (forward of the rewrite
prompt, backward into layer-0 keys, an Adam step: `finetune_edit`'s loop), in windows: worker 0 alone, all P
at once, the last worker alone. Variants are interleaved within each repeat (their order rotates), so slow
drifts in the machine's load hit them alike. Printed per variant: median step time alone and concurrent, and
kept = alone / concurrent (the share of its solo speed each process keeps; 0.5 is a fair half of the cores).

Variants POLICY/THREADS: `spin` = libgomp's default wait policy (idle threads poll ~300k times before sleeping),
`passive` = `kvedit.runtime.configure_threads` (OMP_WAIT_POLICY=PASSIVE), `spinN` = GOMP_SPINCOUNT=N (a shorter
spin, e.g. spin10k); threads 1, 2, or `default` (torch: one per core).

Usage: python benchmarks/concurrent_processes.py [--seconds 10] [--repeats 2] [--procs 2]
           [--variants spin/default,passive/default,spin/1,passive/1] [--model smollm2-135m] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND")


# ---------------------------------------------------------------------------------------------- worker process


def worker(policy: str, threads: str, model: str | None, batch: int) -> None:
    """Load the model, then answer window requests on stdin ("<start> <end>" in time.monotonic, shared by every
    process on Linux) with the durations of the steps that ran entirely inside the window (at least the first
    one, if it alone outlasts the window), as JSON."""
    if policy == "passive":
        from kvedit.runtime import configure_threads

        configure_threads(None if threads == "default" else int(threads))
    elif policy != "spin":
        os.environ["GOMP_SPINCOUNT"] = policy.removeprefix("spin")
    import torch

    if policy != "passive" and threads != "default":
        torch.set_num_threads(int(threads))
    from kvedit import load_model
    from kvedit.data.demo_facts import demo_requests
    from kvedit.editing import make_settings
    from kvedit.editing.finetune import encode_request, finetune_parameters
    from kvedit.evaluation.scoring import TargetBatch, score_batch

    lm = load_model(model)
    hp = make_settings(lm, "ft-keys")
    requests = demo_requests()[:batch]
    data = TargetBatch.collate([encode_request(lm, r, hp.objective) for r in requests], lm.tokenizer.pad_token_id)
    lm.model.requires_grad_(False)
    params = [lm.model.get_parameter(name) for name in finetune_parameters(lm, hp)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-9)  # the step's cost without moving far from the model

    def step() -> None:
        nll = score_batch(lm, data).nll
        optimizer.zero_grad(set_to_none=True)
        nll.mean().backward()
        optimizer.step()

    for _ in range(3):
        step()  # warm-up: allocations, first backward
    print(
        json.dumps(
            {"ready": True, "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY")}
        ),
        flush=True,
    )
    for line in sys.stdin:
        start, end = map(float, line.split())
        while time.monotonic() < start:
            time.sleep(0.001)
        durations = []
        while (t0 := time.monotonic()) < end:
            step()
            if (t1 := time.monotonic()) <= end or not durations:  # at least one step, however slow
                durations.append(t1 - t0)
        print(json.dumps({"durations": durations}), flush=True)


# ---------------------------------------------------------------------------------------------- driver


class Workers:
    """P worker processes of one variant, with a clean environment (the variant sets every thread variable)."""

    def __init__(self, variant: str, procs: int, model: str | None, batch: int) -> None:
        policy, threads = variant.split("/")
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
        cmd = [sys.executable, __file__, "--worker", policy, threads, "--batch", str(batch)]
        cmd += ["--model", model] if model else []
        self.procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(procs)
        ]
        self.info = [json.loads(self._line(p)) for p in self.procs]

    @staticmethod
    def _line(proc: subprocess.Popen) -> str:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {proc.pid} exited with {proc.wait()} before answering")
        return line

    def window(self, which: Sequence[int], seconds: float) -> list[list[float]]:
        """Step durations of the workers `which`, all timing the same window."""
        start = time.monotonic() + 0.2
        for i in which:
            self.procs[i].stdin.write(f"{start} {start + seconds}\n")
            self.procs[i].stdin.flush()
        return [json.loads(self._line(self.procs[i]))["durations"] for i in which]

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait(timeout=60)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timing window")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="processes running at once in the concurrent window")
    parser.add_argument("--variants", default="spin/default,passive/default,spin/1,passive/1")
    parser.add_argument("--model", default=None, help="a model name or folder (default: the bundled model)")
    parser.add_argument("--batch", type=int, default=1, help="requests per step (FT edits one by default)")
    parser.add_argument("--worker", nargs=2, metavar=("POLICY", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.model, args.batch)
        return

    variants = args.variants.split(",")
    alone: dict[str, list[float]] = {v: [] for v in variants}
    together: dict[str, list[float]] = {v: [] for v in variants}
    kept: dict[str, list[float]] = {v: [] for v in variants}
    print(
        f"{os.cpu_count()} CPUs; load average {load()}; windows of {args.seconds:g} s; {args.procs} processes "
        f"at once; {args.repeats} repeats",
        flush=True,
    )
    for repeat in range(args.repeats):
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for variant in order:
            workers = Workers(variant, args.procs, args.model, args.batch)
            try:
                first = workers.window([0], args.seconds)[0]
                both = workers.window(range(args.procs), args.seconds)
                last = workers.window([args.procs - 1], args.seconds)[0]
            finally:
                workers.close()
            solo = statistics.median(first + last)
            concurrent = statistics.median([d for ds in both for d in ds])
            alone[variant].append(solo)
            together[variant].append(concurrent)
            kept[variant].append(solo / concurrent)
            print(
                f"  repeat {repeat + 1} {variant:<16} threads {workers.info[0]['threads']}: alone "
                f"{solo * 1e3:7.1f} ms/step, {args.procs} at once {concurrent * 1e3:8.1f} ms/step "
                f"({min(map(len, both))}-{max(map(len, both))} steps each), kept {solo / concurrent:.2f}; "
                f"load {load()}",
                flush=True,
            )
    print(f"\n{'variant':<16} {'alone ms/step':>14} {'at once ms/step':>16} {'kept (min-max)':>16}")
    for v in variants:
        print(
            f"{v:<16} {statistics.median(alone[v]) * 1e3:>14.1f} {statistics.median(together[v]) * 1e3:>16.1f} "
            f"{statistics.median(kept[v]):>8.2f} ({min(kept[v]):.2f}-{max(kept[v]):.2f})"
        )
    print(f"load average at the end {load()}")


if __name__ == "__main__":
    main()
