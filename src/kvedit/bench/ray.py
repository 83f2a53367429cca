"""`kvedit bench --ray`: the bench's batches spread over Ray actors, one model copy per actor.

The driver (the `kvedit bench` process) keeps everything that makes a run resumable: it selects the cases,
scores the unedited model, computes the key statistics and context templates once (`prepare`), and alone
appends records to `cases.jsonl`. Workers are Ray actors; each loads the model once, receives the driver's
cache files through Ray's object store (so no worker computes statistics, whether or not the nodes share a
file system), and runs whole batches with the same `BatchRunner` a one-process run uses. A batch whose
worker dies is queued again and a new worker takes the dead one's place; a killed driver resumes as a
one-process run does, from `cases.jsonl`.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.requests import EditRequest
from ..evaluation.suites import SUITES
from ..extras import RAY_INSTALL
from ..models.cache import cache_dir, write_atomic
from ..models.lm import LM
from .runner import BatchRunner, RunSpec

#: a batch of work: the run, the batch's index in the run, its cases
Task = tuple[RunSpec, int, list[EditRequest]]


class DistributedError(RuntimeError):
    """The distributed run could not start or lost too many workers."""


def require_ray():
    """The `ray` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise DistributedError(f"--ray needs Ray, an optional extra: {RAY_INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run.

    address: None starts a local Ray instance for the run; "auto" joins the cluster this machine belongs
        to; "ray://host:10001" or "host:6379" names a head node.
    model, dtype, device: how each worker loads the model (as `load_model` takes them).
    compute_dtype: the precision of each worker's inner loops (`models.compute`), as `--compute-dtype` sets the
        driver's; a worker without bfloat16 matrix units refuses bfloat16 as the driver would.
    max_restarts: how many dead workers may be replaced before the run gives up.
    """

    address: str | None = None
    workers: int = 2
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    compute_dtype: str = "float32"
    max_restarts: int = 4

    def check(self) -> "RaySettings":
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.worker_cpus <= 0 or self.worker_gpus < 0:
            raise ValueError(
                f"--worker-cpus must be > 0 and --worker-gpus >= 0, got {self.worker_cpus}, {self.worker_gpus}"
            )
        return self


def cache_payload(lm: LM) -> dict[str, bytes]:
    """The cache files a worker needs for this model (key statistics, context templates): relative path →
    bytes. Everything `prepare` wrote for the model's unedited fingerprint."""
    root = cache_dir()
    files = [p for p in (root / "stats" / lm.base_fingerprint).rglob("*.safetensors")]
    files += list((root / "templates").glob(f"{lm.base_fingerprint}-*.json"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


class BenchWorker:
    """A Ray actor's state: its model and `BatchRunner`. Created with `ray.remote(BenchWorker)`."""

    def __init__(
        self,
        settings: RaySettings,
        fingerprint: str,
        suite: str,
        seed: int,
        edit_settings: dict[str, Any],
        snippets: Any,
        cache_files: dict[str, bytes],
        reuse_targets: bool = False,
    ) -> None:
        from ..models.compute import set_compute_dtype
        from ..models.devices import resolve_device
        from ..models.loading import load_model

        # as many threads as the CPUs Ray reserved: the driver's OMP_NUM_THREADS reaches every worker, and two
        # workers at 2 threads each on 2 cores would fight over them
        torch.set_num_threads(max(1, int(settings.worker_cpus)))
        root = cache_dir()
        for rel, data in cache_files.items():  # the driver's statistics and templates, where missing
            path = root / rel
            if not path.exists():
                write_atomic(path, lambda tmp: tmp.write_bytes(data))
        self.lm = set_compute_dtype(
            load_model(settings.model, device=resolve_device(settings.device), dtype=settings.dtype),
            settings.compute_dtype,
        )
        if self.lm.fingerprint() != fingerprint:
            raise DistributedError(
                f"worker on {os.uname().nodename} loaded {settings.model or 'the bundled model'} "
                f"with fingerprint {self.lm.fingerprint()}, the driver has {fingerprint}: the "
                "nodes must hold the same model"
            )
        self.runner = BatchRunner(
            self.lm, SUITES[suite], seed, edit_settings, snippets, progress=False, reuse_targets=reuse_targets
        )
        self.prepared: set[str] = set()

    def run_batch(
        self, spec: RunSpec, batch: list[EditRequest], index: int, predictions: dict[Any, Any]
    ) -> list[dict[str, Any]]:
        """Edit, score and revert one batch; prepares the run (from the shipped cache) on first use."""
        if spec.key not in self.prepared:
            self.runner.prepare(spec)
            self.prepared.add(spec.key)
        self.runner.unedited_predictions = predictions
        return self.runner.run_batch(spec, batch, index)

    def statistics_computed(self) -> int:
        """How many layers' key statistics this worker computed itself (0: all came from the driver)."""
        return int(self.lm.memo.get("key_statistics_computed", 0))


class WorkerPool:
    """Ray actors that run tasks; a dead actor's task goes back to the queue and a new actor replaces it."""

    def __init__(self, settings: RaySettings, runner: BatchRunner) -> None:
        self.ray = require_ray()
        self.settings = settings.check()
        self.started_ray = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if settings.address is None:
                kwargs["num_cpus"] = max(1, int(settings.workers * settings.worker_cpus + 0.999))
            self.ray.init(address=settings.address, **kwargs)
            self.started_ray = True
        lm = runner.lm
        payload = self.ray.put(cache_payload(lm))
        remote = self.ray.remote(BenchWorker).options(num_cpus=settings.worker_cpus, num_gpus=settings.worker_gpus)
        self._start = lambda: remote.remote(
            settings,
            lm.fingerprint(),
            runner.suite.name,
            runner.seed,
            runner.settings,
            runner.snippets,
            payload,
            runner.reuse_targets,
        )
        self.actors = [self._start() for _ in range(settings.workers)]
        self.restarts = 0

    def run(
        self,
        tasks: Sequence[Task],
        predictions: dict[Any, Any],
        on_records: Callable[[RunSpec, list[dict[str, Any]]], None],
        on_progress: Callable[["WorkerPool"], None] | None = None,
        progress: bool = True,
    ) -> None:
        """Run every task; `on_records(spec, records)` is called in this process as each batch finishes."""
        errors = (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError)
        queue, idle = deque(tasks), list(self.actors)
        in_flight: dict[Any, tuple[Any, Task]] = {}
        bar = tqdm(
            total=len(queue), unit="batch", desc=f"batches on {len(self.actors)} Ray workers", disable=not progress
        )

        def dispatch() -> None:
            while idle and queue:
                actor, task = idle.pop(), queue.popleft()
                spec, index, batch = task
                wanted = {r.case_id: predictions[r.case_id] for r in batch if r.case_id in predictions}
                in_flight[actor.run_batch.remote(spec, batch, index, wanted)] = (actor, task)

        while queue or in_flight:
            dispatch()
            (ref,), _ = self.ray.wait(list(in_flight), num_returns=1)
            actor, task = in_flight.pop(ref)
            try:
                records = self.ray.get(ref)
            except errors as err:
                self._replace(actor, err)
                queue.appendleft(task)
                idle.append(self.actors[-1])
                continue
            idle.append(actor)
            dispatch()  # the worker starts its next batch while this process writes (on_records may summarise)
            on_records(task[0], records)
            bar.update(1)
            if on_progress is not None:
                on_progress(self)
        bar.close()

    def _replace(self, dead: Any, err: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.settings.max_restarts:
            raise DistributedError(
                f"{self.restarts} Ray workers died (last: {err}); giving up. Finished batches "
                "are in cases.jsonl: run the same command again to resume"
            ) from err
        warnings.warn(
            f"a Ray worker died ({type(err).__name__}); its batch goes back to the queue and a new worker starts",
            stacklevel=2,
        )
        self.actors = [a for a in self.actors if a is not dead] + [self._start()]

    def statistics_computed(self) -> list[int]:
        """Per live worker, how many layers' statistics it computed itself."""
        return self.ray.get([a.statistics_computed.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_ray:
            self.ray.shutdown()
