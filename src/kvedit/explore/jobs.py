"""Background jobs for long work (edits, mining): one at a time, in a thread, polled by the page.

A job holds the model for as long as it runs; quick reads of the model (a prompt, a memory) are refused
with `Busy` meanwhile instead of waiting, so the page never hangs. Progress is the job's own phase text
plus every progress bar (tqdm) open while it runs: the statistics, target-vector and mining bars of the
library show up in the page as they do in a terminal.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm


class Busy(RuntimeError):
    """The model is held by a running job; try again when it has finished."""


class NotFound(LookupError):
    """No edit or job with that id."""


def open_bars() -> list[dict[str, Any]]:
    """Every tqdm bar open in this process: description, count, total, unit, rate (items/s).

    Reads tqdm's registry of live bars (`tqdm._instances`, where tqdm keeps them to stack them on the
    terminal); closed and disabled bars are not in it.
    """
    bars = []
    with tqdm.get_lock():
        live = list(getattr(tqdm, "_instances", ()))
    for bar in live:
        info = bar.format_dict
        bars.append({"desc": bar.desc or "", "n": info.get("n", 0), "total": info.get("total"),
                     "unit": info.get("unit", "it"), "rate": info.get("rate"), "elapsed_s": info.get("elapsed")})
    return bars


@dataclass
class Job:
    """One piece of long work. `state`: queued → running → done | failed."""

    id: int
    kind: str
    title: str
    state: str = "queued"
    phase: str = "waiting for the model"
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def set_phase(self, text: str) -> None:
        self.phase = text

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def to_dict(self) -> dict[str, Any]:
        end = self.finished or time.time()
        return {"id": self.id, "kind": self.kind, "title": self.title, "state": self.state, "phase": self.phase,
                "elapsed_s": round(end - self.started, 2), "bars": open_bars() if self.state == "running" else [],
                "result": self.result, "error": self.error}


class JobRunner:
    """Runs one job at a time in a background thread, holding `model_lock` while it runs."""

    def __init__(self, model_lock: threading.Lock, keep: int = 50) -> None:
        self.model_lock = model_lock
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._mutex = threading.Lock()
        self._keep = keep

    def active(self) -> Job | None:
        with self._mutex:
            return next((j for j in self.jobs.values() if j.active), None)

    def get(self, job_id: int) -> Job:
        if job_id not in self.jobs:
            raise NotFound(f"no job {job_id}; jobs known: {sorted(self.jobs)[-10:]}")
        return self.jobs[job_id]

    def submit(self, kind: str, title: str, work: Callable[[Job], Any]) -> Job:
        """Start `work(job)` in a thread (its return value becomes `job.result`); refuse while a job runs."""
        with self._mutex:
            running = next((j for j in self.jobs.values() if j.active), None)
            if running is not None:
                raise Busy(f"{running.title} is still running ({running.phase}); wait for it to finish")
            job = Job(next(self._ids), kind, title)
            self.jobs[job.id] = job
            for old in sorted(self.jobs)[: max(0, len(self.jobs) - self._keep)]:
                del self.jobs[old]
        threading.Thread(target=self._run, args=(job, work), name=f"kvedit-job-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        with self.model_lock:
            job.state, job.phase = "running", "starting"
            try:
                job.result = work(job)
                job.state, job.phase = "done", "finished"
            except Exception as err:  # the page shows the message; the work restored what it changed
                job.error = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
                job.state, job.phase = "failed", "failed"
                if not isinstance(err, (ValueError, OSError)):
                    traceback.print_exc()
            finally:
                job.finished = time.time()

    def wait(self, job_id: int, timeout: float = 600.0) -> Job:
        """Block until job `job_id` has finished (tests and scripts; the page polls instead)."""
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
        while job.active:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} ({job.title}) still {job.state} after {timeout} s")
            time.sleep(0.02)
        return job

    @contextmanager
    def quick_use(self) -> Iterator[None]:
        """Hold the model for a short read; raise `Busy` at once if a job holds it."""
        while not self.model_lock.acquire(timeout=0.05):
            job = self.active()
            if job is not None:
                raise Busy(f"the model is busy with {job.title} ({job.phase}); "
                           "this view is available again when it finishes")
        try:
            yield
        finally:
            self.model_lock.release()
