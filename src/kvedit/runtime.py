"""Process-wide runtime settings: how many CPU threads torch uses, and how its idle threads wait.

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp, which MKL and oneDNN use too). By default a
libgomp thread that finishes its share of a region spins on the CPU (up to ~300,000 polls) before it sleeps, so
that the next region starts without a wake-up. An FT edit on a small model is a long chain of small regions, so
its threads wait briefly and often; in one process on free cores the spinning is cheap. When other processes
share the cores, each spinning thread burns the time slice another process's working thread needs: two or more
kvedit processes on one laptop then slow each other far beyond their share (`benchmarks/concurrent_processes.py`
measures it). libgomp reads its wait policy once, when torch is imported, from the environment.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from types import MappingProxyType

#: set by `configure_threads` unless the user's environment already names them. PASSIVE: a thread with no work
#: sleeps at once (libgomp's spin count becomes 0) instead of spinning for the next region.
THREAD_ENVIRONMENT: Mapping[str, str] = MappingProxyType({"OMP_WAIT_POLICY": "PASSIVE"})


def configure_threads(threads: int | None) -> None:
    """Make torch's CPU threads yield their cores when idle, and use `threads` of them when given.

    Sets each variable of `THREAD_ENVIRONMENT` (OMP_WAIT_POLICY=PASSIVE) with `os.environ.setdefault`, so a value
    the user exported wins (OMP_WAIT_POLICY=ACTIVE gets the spinning back; GOMP_SPINCOUNT alone tunes it and is
    then respected: the policy is left alone). libgomp reads these when torch is first imported, so call this
    before anything imports torch; called later it warns that the wait policy is already fixed. The variables
    also reach child processes (Ray workers). `threads` (>= 1): `torch.set_num_threads(threads)`, the size of the
    thread team each parallel region uses (None keeps torch's default: one per core, or OMP_NUM_THREADS).
    """
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    user_tuned = any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    if not user_tuned:
        if "torch" in sys.modules:
            warnings.warn(
                "configure_threads was called after torch was imported: OpenMP's wait policy is already "
                "fixed (idle threads spin); set OMP_WAIT_POLICY=PASSIVE in the environment or call it "
                "before importing torch",
                stacklevel=2,
            )
        for name, value in THREAD_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    if threads is not None:
        import torch  # only here: the environment above must be in place before torch loads libgomp

        torch.set_num_threads(threads)


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (2³⁰ bytes), as the OS counts it (`ru_maxrss`)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20
