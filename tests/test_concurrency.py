"""Two kvedit processes on one machine (issue 28 item 6): torch's OpenMP threads spun while idle, so processes
sharing the cores slowed each other far beyond their share (a fifth of solo speed and less). Every kvedit command
now starts with `configure_threads` (OMP_WAIT_POLICY=PASSIVE unless the user set it; --threads N). These tests
read the settings a real kvedit process runs with from the process itself (libgomp's OMP_DISPLAY_ENV report), and
time two real processes at once against each alone. `benchmarks/concurrent_processes.py` measures an FT step on
the bundled model, before and after."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import pytest

from kvedit.runtime import configure_threads

THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_DISPLAY_ENV")

#: runs the CLI, then reports what torch runs with; libgomp prints its settings when torch loads it (with
#: OMP_DISPLAY_ENV=VERBOSE; its OMP_WAIT_POLICY line says PASSIVE when unset, GOMP_SPINCOUNT is the spinning)
CLI_CHILD = """
import os, sys
from kvedit.cli import main
code = main(sys.argv[1:])
import torch
print("RESULT", code, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"), flush=True)
"""

#: a kvedit process's start (configure_threads, as `kvedit.cli.main` calls it) and an FT-like step: small
#: matrix products, activations, norms and a backward, many short parallel regions; then timing windows
WORKER = """
import json, sys, time
from kvedit.runtime import configure_threads
configure_threads(None)
import torch
torch.manual_seed(0)
d, h = 576, 1536
weights = [(torch.randn(h, d) * 0.02, torch.randn(d, h) * 0.02) for _ in range(8)]
x0, key = torch.randn(12, d), weights[0][0].clone().requires_grad_(True)
def step():
    x = x0
    for i, (up, down) in enumerate(weights):
        x = torch.nn.functional.layer_norm(x + torch.nn.functional.silu(x @ (key if i == 0 else up).T) @ down.T, (d,))
    x.square().mean().backward()
    key.grad = None
for _ in range(5):
    step()
print("ready", flush=True)
for line in sys.stdin:
    start, end = map(float, line.split())
    while time.monotonic() < start:
        time.sleep(0.001)
    steps = 0
    while time.monotonic() < end:
        step()
        steps += 1
    print(json.dumps(steps / (time.monotonic() - start)), flush=True)
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return env | extra


#: what `kvedit.cli.main` starts with, alone (quicker than the CLI's imports)
START_CHILD = """
import os
from kvedit.runtime import configure_threads
configure_threads(None)
import torch
print("RESULT 0", torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"), flush=True)
"""


def _run_child(code: str, *argv: str, **env: str) -> tuple[list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(OMP_DISPLAY_ENV="VERBOSE", **env),
    )
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result, done.stdout + done.stderr
    return result[-1].split()[1:], done.stderr


EDIT = ["edit", "--model", "/does/not/exist", "--prompt", "{} is in", "--subject", "x", "--new", "y"]


def test_a_kvedit_process_waits_without_spinning_and_takes_threads():
    (code, threads, policy), report = _run_child(CLI_CHILD, *EDIT, "--threads", "1")
    assert code == "2"  # the model does not exist: the process still ran its start-up and loaded torch
    assert threads == "1" and policy == "PASSIVE"
    assert "GOMP_SPINCOUNT = '0'" in report  # libgomp itself: an idle thread sleeps at once (default 300000)
    # the user's own setting wins
    (_, _, policy), report = _run_child(START_CHILD, OMP_WAIT_POLICY="ACTIVE")
    assert policy == "ACTIVE" and "OMP_WAIT_POLICY = 'ACTIVE'" in report and "GOMP_SPINCOUNT = '0'" not in report
    (_, _, policy), report = _run_child(START_CHILD, GOMP_SPINCOUNT="10000")
    assert policy == "None" and "GOMP_SPINCOUNT = '10000'" in report


def test_configure_threads_checks_its_argument_and_says_when_it_is_too_late(monkeypatch):
    import torch

    for bad in (0, -2, True, 1.5, "2"):
        with pytest.raises(ValueError, match="--threads must be a positive integer"):
            configure_threads(bad)  # type: ignore[arg-type]
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    before = torch.get_num_threads()
    try:
        with pytest.warns(UserWarning, match="after torch was imported"):
            configure_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the user chose: nothing to warn about, nothing changed
            configure_threads(None)
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _speeds(seconds: float = 1.5) -> tuple[list[float], list[float]]:
    """Steps per second of two worker processes: each alone (one window each) and both at once (between)."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_clean_env()
        )
        for _ in range(2)
    ]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready"

        def window(which: list[int]) -> list[float]:
            start = time.monotonic() + 0.1
            for i in which:
                workers[i].stdin.write(f"{start} {start + seconds}\n")
                workers[i].stdin.flush()
            return [json.loads(workers[i].stdout.readline()) for i in which]

        first, together, last = window([0]), window([0, 1]), window([1])
    finally:
        for w in workers:
            w.kill()
            w.wait()
    return first + last, together


def test_two_concurrent_kvedit_processes_each_keep_a_third_of_their_solo_speed():
    """Before the fix the two processes of this workload kept 0.15-0.33 of their solo speed in most attempts (with
    it, 0.6-2: other processes' load slows the solo windows too). Outside load can also cripple a spinning
    process's solo window, so this ratio alone does not always fail before the fix: the settings test above does.
    The machine is shared, so an attempt spoiled by a burst of outside load is repeated (three at most)."""
    kept = []
    for _ in range(3):
        alone, together = _speeds()
        kept.append([t / a for a, t in zip(alone, together)])
        if min(kept[-1]) >= 1 / 3:
            return
    pytest.fail(
        f"concurrent / solo steps per second, per attempt and process: {kept} (median alone "
        f"{statistics.median(alone):.1f}/s); expected each >= 1/3"
    )
