"""Background jobs for long work (edits, mining): one at a time, in a thread, polled by the page, cancellable.

The model has one lock. A job takes it when it is submitted and keeps it until it ends; a quick read of the
model (a prompt, a memory, a revert) takes it only if it is free at once (or after a short wait for another
quick read), and otherwise is refused with `Busy`, naming what holds the model, so no request waits silently.

Cancelling sets a flag that the job's own thread checks at every forward pass through a decoder layer and
after every optimiser step (hooks installed for the job's lifetime), so a job stops between steps of any
editor, statistics pass or mining run without the editors knowing about it; the `Cancelled` exception then
unwinds through the editing code, whose weight guards restore every weight exactly. Progress is the open
progress bar (tqdm: statistics, target vectors, mining) or, while an edit optimises, the optimiser steps
counted by the same hook against the step limit.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm import tqdm


class Busy(RuntimeError):
    """The model is held by a running job or another request; try again when it has finished."""


class NotFound(LookupError):
    """No edit or job with that id."""


class Cancelled(Exception):
    """A job stopped because it was asked to; what it changed has been restored."""


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
        bars.append(
            {
                "desc": bar.desc or "",
                "n": info.get("n", 0),
                "total": info.get("total"),
                "unit": info.get("unit", "it"),
                "rate": info.get("rate"),
                "elapsed_s": info.get("elapsed"),
            }
        )
    return bars


@dataclass
class Job:
    """One piece of long work. `state`: queued → running → done | failed | cancelled."""

    id: int
    kind: str
    title: str
    state: str = "queued"
    phase: str = "waiting for the model"
    result: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    steps_done: int = 0
    steps_total: int | None = None
    steps_what: str = ""
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    def set_phase(self, text: str) -> None:
        self.phase = text

    def expect_steps(self, total: int | None, what: str) -> None:
        """From now on, report progress as optimiser steps out of `total` (None: no step count)."""
        self.steps_done, self.steps_total, self.steps_what = 0, total, what

    def check(self) -> None:
        """Raise `Cancelled` if the job was asked to stop."""
        if self.cancel_requested.is_set():
            raise Cancelled(f"job {self.id} ({self.title}) was cancelled")

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def progress(self, bars: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """How far the current phase is: the first open progress bar with a total, else the optimiser steps."""
        for bar in bars:
            if bar["total"]:
                return {
                    "what": bar["desc"] or self.phase,
                    "done": bar["n"],
                    "total": bar["total"],
                    "unit": bar["unit"],
                    "fraction": min(1.0, bar["n"] / bar["total"]),
                }
        if self.steps_total:
            return {
                "what": self.steps_what,
                "done": self.steps_done,
                "total": self.steps_total,
                "unit": "step",
                "fraction": min(1.0, self.steps_done / self.steps_total),
            }
        return None

    def to_dict(self) -> dict[str, Any]:
        end = self.finished or time.time()
        bars = open_bars() if self.state == "running" else []
        progress = (
            self.progress(bars)
            if self.state == "running"
            else (
                {"what": self.phase, "done": 1, "total": 1, "unit": "job", "fraction": 1.0}
                if self.state == "done"
                else None
            )
        )
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "state": self.state,
            "phase": self.phase,
            "elapsed_s": round(end - self.started, 2),
            "bars": bars,
            "progress": progress,
            "cancel_requested": self.cancel_requested.is_set() and self.active,
            "result": self.result,
            "error": self.error,
        }


class JobRunner:
    """Runs one job at a time in a background thread, holding `model_lock` while it runs.

    `cancel_points`: modules (the model's decoder layers) whose every forward pass checks the running job's
    cancel flag. `quick_wait`: how long a quick read waits for another quick read before it is refused.
    """

    def __init__(
        self,
        model_lock: threading.Lock,
        keep: int = 50,
        cancel_points: Sequence[torch.nn.Module] = (),
        quick_wait: float = 1.0,
    ) -> None:
        self.model_lock = model_lock
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._mutex = threading.Lock()
        self._keep = keep
        self._cancel_points = list(cancel_points)
        self._quick_wait = quick_wait
        self._holder: str | None = None  # what holds model_lock, for the busy message
        self._threads: dict[int, threading.Thread] = {}
        self._closing = False
        self.stopped: Job | None = None  # the job that shutdown() cancelled, if any

    def active(self) -> Job | None:
        with self._mutex:
            return next((j for j in self.jobs.values() if j.active), None)

    def get(self, job_id: int) -> Job:
        with self._mutex:
            if job_id not in self.jobs:
                raise NotFound(f"no job {job_id}; jobs known: {sorted(self.jobs)[-10:]}")
            return self.jobs[job_id]

    def _busy(self) -> Busy:
        job = self.active()
        if self._closing:
            return Busy("the explorer is shutting down")
        if job is not None:
            return Busy(
                f"the model is busy with job {job.id}: {job.title} ({job.phase}); wait for it to finish or "
                f"cancel it (DELETE /api/jobs/{job.id}, or Cancel in the page)"
            )
        return Busy(f"the model is busy with {self._holder or 'another request'}; try again in a moment")

    def _acquire(self, what: str, wait: float) -> None:
        """Take the model lock within `wait` seconds (0: only if free now) or raise `Busy`."""
        if self._closing:
            raise self._busy()
        if not self.model_lock.acquire(blocking=False):
            if self.active() is not None or not self.model_lock.acquire(timeout=wait):
                raise self._busy()
        self._holder = what

    def _release(self) -> None:
        self._holder = None
        self.model_lock.release()

    def submit(self, kind: str, title: str, work: Callable[[Job], Any]) -> Job:
        """Start `work(job)` in a thread (its return value becomes `job.result`); `Busy` unless the model is free."""
        with self._mutex:
            running = next((j for j in self.jobs.values() if j.active), None)
            if running is not None:
                raise Busy(
                    f"job {running.id}: {running.title} is still running ({running.phase}); wait for it to "
                    f"finish or cancel it"
                )
        self._acquire(title, self._quick_wait)  # only a quick read can hold it now: wait that long at most
        with self._mutex:
            job = Job(next(self._ids), kind, title)
            self.jobs[job.id] = job
            for old in sorted(self.jobs)[: max(0, len(self.jobs) - self._keep)]:
                if not self.jobs[old].active:
                    del self.jobs[old]
        thread = threading.Thread(target=self._run, args=(job, work), name=f"kvedit-job-{job.id}")
        self._threads[job.id] = thread
        try:
            thread.start()
        except BaseException:
            job.state, job.error, job.finished = "failed", "could not start a thread", time.time()
            self._release()
            raise
        return job

    @contextmanager
    def _watching(self, job: Job) -> Iterator[None]:
        """Hooks that, in this thread only, stop `job` when cancelled and count its optimiser steps."""
        me = threading.get_ident()

        def before_forward(module: torch.nn.Module, args: Any) -> None:
            if threading.get_ident() == me:
                job.check()

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if threading.get_ident() == me:
                job.steps_done += 1
                job.check()

        handles = [m.register_forward_pre_hook(before_forward) for m in self._cancel_points]
        handles.append(register_optimizer_step_post_hook(after_step))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        try:
            job.state, job.phase = "running", "starting"
            job.check()
            with self._watching(job):
                job.result = work(job)
            job.state, job.phase = "done", "finished"
        except Cancelled:
            job.state, job.phase = "cancelled", "cancelled; the model is as it was before the job"
            job.error = "cancelled"
        except Exception as err:  # the page shows the message; the work restored what it changed
            job.error = f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
            job.state, job.phase = "failed", "failed"
            if not isinstance(err, (ValueError, OSError)):
                traceback.print_exc()
        finally:
            job.steps_total = None
            job.finished = time.time()
            self._release()
            self._threads.pop(job.id, None)

    def cancel(self, job_id: int) -> Job:
        """Ask job `job_id` to stop at its next step; refuse (`Busy`'s sibling, ValueError) a finished job."""
        job = self.get(job_id)
        if not job.active:
            raise JobFinished(f"job {job_id} ({job.title}) has already ended ({job.state}); nothing to cancel")
        job.cancel_requested.set()
        job.set_phase("cancelling: stopping at the next step and restoring the weights")
        return job

    def wait(self, job_id: int, timeout: float = 600.0) -> Job:
        """Block until job `job_id` has finished (tests and scripts; the page polls instead)."""
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
        while job.active or job.id in self._threads:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} ({job.title}) still {job.state} after {timeout} s")
            time.sleep(0.02)
        return job

    def shutdown(self, timeout: float = 60.0) -> Job | None:
        """Refuse new work, cancel the running job and wait for its thread to end (a clean exit: no torch
        thread is left running while the interpreter shuts down); returns the job it cancelled, if any
        (also kept as `stopped`)."""
        self._closing = True
        job = self.active()
        if job is not None:
            job.cancel_requested.set()
            self.stopped = job
        for thread in list(self._threads.values()):
            thread.join(timeout)
        return job

    @contextmanager
    def quick_use(self, what: str = "another request") -> Iterator[None]:
        """Hold the model for a short read `what`; raise `Busy` at once if a job holds it, or after
        `quick_wait` seconds if another quick read does."""
        self._acquire(what, self._quick_wait)
        try:
            yield
        finally:
            self._release()


class JobFinished(ValueError):
    """The job has already ended; it cannot be cancelled."""
