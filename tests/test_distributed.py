"""`kvedit bench --ray` on a local Ray instance with two single-CPU workers and a tiny model."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch

from helpers import FACTS as ALL_FACTS
from helpers import write_facts

from kvedit.bench.config import BenchConfig
from kvedit.bench.folder import load_cases_file
from kvedit.bench.harness import Bench
from kvedit.cli import main
from kvedit.models import load_model

ray = pytest.importorskip("ray")
from kvedit.bench.ray import BenchWorker, RaySettings  # noqa: E402

FACTS = ALL_FACTS[:4]
SENTENCE = "the eiffel tower is located in the city of paris and rome is the capital of italy"


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance whose workers have their own, empty kvedit cache."""
    worker_cache = tmp_path_factory.mktemp("worker-cache")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"KVEDIT_CACHE": str(worker_cache)}},
    )
    yield worker_cache
    ray.shutdown()


@pytest.fixture
def setup(tmp_path, monkeypatch, tiny_folder, kvedit_cache):
    data = write_facts(tmp_path / "facts.json", FACTS)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(SENTENCE for _ in range(100)))
    config = BenchConfig(
        dataset=str(data),
        methods=("ft-values", "memit"),
        stats_source=str(corpus),
        stats_tokens=300,
        extra={"layers": (1,), "max_steps": 3},
    )
    return config, RaySettings(workers=2, model=str(tiny_folder))


def comparable(folder):
    """Records sorted by (run, case), without the wall times."""
    records = load_cases_file(folder / "cases.jsonl")
    return sorted(
        ({k: v for k, v in r.items() if k != "time_s"} for r in records), key=lambda r: (r["run"], r["case_id"])
    )


def close(x, y) -> bool:
    """Equal, with floats to 1e-4 (workers run one thread, the driver two: sums round differently)."""
    if isinstance(x, float) or isinstance(y, float):
        return x == pytest.approx(y, rel=1e-4, abs=1e-6)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(close(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
    return x == y


def assert_same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert close(x[key], y[key]), (key, x[key], y[key])


def test_sharded_run_equals_one_process_and_computes_statistics_once(ray_instance, setup, tmp_path):
    config, settings = setup
    lm = load_model(settings.model)
    Bench(lm, config, tmp_path / "local", progress=False).run()

    lm = load_model(settings.model)  # a fresh driver: nothing in memory
    seen = []
    summary = Bench(lm, config, tmp_path / "ray", progress=False).run(
        ray=settings, on_progress=lambda pool: seen.append(pool.statistics_computed())
    )
    assert summary["complete"]
    assert_same_records(comparable(tmp_path / "ray"), comparable(tmp_path / "local"))
    # the driver loaded (or computed) the statistics once; no worker computed any
    assert seen and all(counts == [0, 0] for counts in seen)
    assert not list(ray_instance.glob("stats/*/*.tmp"))
    assert list(ray_instance.glob("stats/*/*.safetensors"))  # shipped through the object store


def test_sharded_run_reusing_targets_scores_as_one_process(ray_instance, setup, tmp_path):
    """--reuse-targets on workers: PMET and an ablation that takes its targets score as in one process, whichever
    worker optimises a case's targets first."""
    config, settings = setup
    config = replace(
        config, methods=("pmet", "pmet-even-spread"), reuse_targets=True, extra={"layers": (0, 1), "max_steps": 3}
    )
    Bench(load_model(settings.model), config, tmp_path / "local", progress=False).run()
    summary = Bench(load_model(settings.model), config, tmp_path / "ray", progress=False).run(ray=settings)
    assert summary["complete"]
    without_reuse = [
        [{k: v for k, v in r.items() if k != "targets_reused_s"} for r in comparable(tmp_path / f)]
        for f in ("ray", "local")
    ]
    assert_same_records(*without_reuse)
    reused = [r for r in load_cases_file(tmp_path / "ray" / "cases.jsonl") if "targets_reused_s" in r]
    assert reused and all(r["time_s"] > r["targets_reused_s"] > 0 for r in reused)


def test_a_finished_run_is_summarised_while_the_next_goes_on(ray_instance, setup, tmp_path):
    """One worker takes the batches in order: when ft-values' last batch is back its summary is on disk, marked
    incomplete, before memit's first batch returns."""
    config, settings = setup
    out = tmp_path / "ray"
    seen = []

    def snapshot(pool):
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
        seen.append(None if summary is None else (summary["complete"], {k: v["n"] for k, v in summary["runs"].items()}))

    Bench(load_model(settings.model), config, out, progress=False).run(
        ray=RaySettings(workers=1, model=settings.model), on_progress=snapshot
    )
    n = len(FACTS)
    assert seen[: n - 1] == [None] * (n - 1)  # ft-values still running: nothing written yet
    assert seen[n - 1] == (False, {"unedited": n, "ft-values": n})
    assert seen[n:] == [(False, {"unedited": n, "ft-values": n})] * n  # memit's batches: no new summary until the end
    final = json.loads((out / "summary.json").read_text())
    assert final["complete"] and final["runs"]["memit"]["n"] == n


def test_a_killed_worker_loses_and_duplicates_nothing(ray_instance, setup, tmp_path):
    config, settings = setup
    killed = []

    def kill_one(pool):
        if not killed:
            killed.append(pool.actors[0])
            ray.kill(pool.actors[0])

    with pytest.warns(UserWarning, match="worker died"):
        Bench(load_model(settings.model), config, tmp_path / "ray", progress=False).run(
            ray=settings, on_progress=kill_one
        )
    Bench(load_model(settings.model), config, tmp_path / "local", progress=False).run()
    records = comparable(tmp_path / "ray")
    assert len({(r["run"], r["case_id"]) for r in records}) == len(records) == 3 * len(FACTS)
    assert_same_records(records, comparable(tmp_path / "local"))


def test_a_killed_driver_resumes(ray_instance, setup, tmp_path):
    config, settings = setup

    def die(pool):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Bench(load_model(settings.model), config, tmp_path / "ray", progress=False).run(ray=settings, on_progress=die)
    partial = load_cases_file(tmp_path / "ray" / "cases.jsonl")
    assert len(partial) < 3 * len(FACTS)
    Bench(load_model(settings.model), config, tmp_path / "ray", progress=False).run(ray=settings)
    records = comparable(tmp_path / "ray")
    assert len({(r["run"], r["case_id"]) for r in records}) == len(records) == 3 * len(FACTS)


def test_cli_bench_with_ray(capsys, ray_instance, setup, tmp_path, tiny_folder):
    config, _ = setup
    code = main(
        [
            "bench",
            "--dataset",
            config.dataset,
            "--methods",
            "ft-keys",
            "--n",
            "2",
            "--model",
            str(tiny_folder),
            "--out",
            str(tmp_path / "cli"),
            "--ray",
            "--workers",
            "2",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| ft-keys" in out and len(load_cases_file(tmp_path / "cli" / "cases.jsonl")) == 4


def test_ray_missing_is_a_clear_error(capsys, monkeypatch, setup, tmp_path):
    config, _ = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    code = main(["bench", "--dataset", config.dataset, "--out", str(tmp_path / "x"), "--ray"])
    assert code == 2 and "pip install 'kvedit[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_worker_runs_as_many_threads_as_cpus_it_holds(setup):
    """Whatever thread count the driver's environment sets, a worker uses the CPUs Ray reserved for it."""
    _, settings = setup
    lm = load_model(settings.model)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        BenchWorker(replace(settings, worker_cpus=1.0), lm.fingerprint(), "counterfact", 0, {}, None, {})
        assert torch.get_num_threads() == 1
        BenchWorker(replace(settings, worker_cpus=2.5), lm.fingerprint(), "counterfact", 0, {}, None, {})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_worker_computes_in_the_drivers_precision(setup):
    """`--compute-dtype` reaches every worker: float32 as asked; bfloat16 where the CPU has bf16 matrix units, and
    where it has none the worker refuses as the driver does (never a silent float32 run under a bf16 folder)."""
    from kvedit.models.compute import ComputeDtypeError, bf16_support

    _, settings = setup
    fingerprint = load_model(settings.model).fingerprint()
    worker = BenchWorker(replace(settings, compute_dtype="float32"), fingerprint, "counterfact", 0, {}, None, {})
    assert worker.lm.compute_dtype == "float32"
    bf16 = replace(settings, compute_dtype="bfloat16")
    if bf16_support("cpu").units:
        assert BenchWorker(bf16, fingerprint, "counterfact", 0, {}, None, {}).lm.compute_dtype == "bfloat16"
    else:
        with pytest.raises(ComputeDtypeError, match="bfloat16"):
            BenchWorker(bf16, fingerprint, "counterfact", 0, {}, None, {})
