"""`kvedit bench`: edit, evaluate and revert over a dataset, one JSON line per case as it goes.

Layout of the output folder::

    .kvedit-lock     held (flock) by the one process running the folder, and who that is (`lock_bench_folder`)
    config.json      settings that must match for a run to resume (dataset, filter, statistics, model)
    known.json       the known-fact filter's result (kept case ids, counts)
    settings.json    per run, the settings its edits used as resolved for the model (a changed one is refused)
    cases.jsonl      one record per (run, case); appended and flushed after every batch
    state/           sequential runs only: per run the chain W₀ → last finished batch and the history (`seqrun`),
                     the fixed samples and measurement settings (`lifelong`)
    sequence.jsonl   sequential runs only: one record per run and batch (new batch, retention, specificity,
                     general ability, weight change)
    summary.json     per run: every metric's mean, 95 % interval and count, edit time; paired comparisons
    summary.csv      the same means as rows
    table.md         the seed's Table 1/3 layout, then the same runs under EasyEdit's definitions

A killed run resumes from cases.jsonl: finished (run, case) pairs are not redone; a partly written
last line is dropped. Growing `n` or adding methods reuses everything already measured.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..data.download import resolve_dataset
from ..data.loaders import DatasetError
from ..data.propagation import case_edits, dataset_format
from ..editing.registry import make_settings
from ..evaluation.generation import AttributeSnippets, load_attribute_snippets
from ..evaluation.summary import compare_runs, easyedit_table, markdown_table, summarize_run, summary_csv
from ..evaluation.suites import Suite, dataset_title
from ..models.lm import LM
from .config import BenchConfig, RunSpec, choose_suite, load_cases, suite_for
from .folder import BenchError, append_records, check_bench_folder, load_cases_file, lock_bench_folder, runs_on_file
from .lines import reuse_line, settings_line
from .runner import BatchRunner, add_unchanged, neighborhood_predictions
from .seqrun import SequentialRun

if TYPE_CHECKING:
    from .ray import RaySettings

Done = set[tuple[str, Any]]


class Bench:
    """A benchmark over one output folder; `run()` executes whatever is not yet in cases.jsonl."""

    def __init__(self, lm: LM | Callable[[], LM], config: BenchConfig, out: str | Path, progress: bool = True) -> None:
        """lm: the model, or a function loading it, called once the folder passed `check_bench_folder` (the one
        check of the folder, whether the bench is made here or by `kvedit bench`: a bad --out is refused before
        the model loads)."""
        self.config, self.out, self.progress = config, Path(out), progress
        self.specs = config.specs()  # the config checked its settings when it was made
        check_bench_folder(self.out)
        self.lm = lm if isinstance(lm, LM) else lm()
        lm = self.lm
        path, fmt = resolve_dataset(config.dataset)
        fmt = (dataset_format(path) or "kvedit") if fmt == "auto" else fmt
        suite = suite_for(config.suite, fmt)
        if config.sequential and not suite.sequential:
            raise BenchError(
                f"--sequential: the {suite.name} suite's cases are scored on their own edits (each case "
                "edited, scored and reverted); run it without --sequential"
            )
        self.requests: list[Any] = load_cases(path, fmt, suite)  # edit requests, or the set's cases
        if not self.requests:
            raise BenchError(f"dataset {config.dataset} has no records")
        self.suite: Suite = choose_suite(config.suite, fmt, self.requests, config.dataset)
        resume_key = config.resume_key(lm, path) | {"suite": self.suite.name}
        lock_bench_folder(self.out)  # held until this process exits: another process on the folder is refused
        self._check_resume(resume_key)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cases, self.filter_info = self._select_cases()
        self.cases_file = self.out / "cases.jsonl"
        settings = dict(config.extra)
        if config.stats_source is not None:
            settings["stats_source"] = config.stats_source
        if config.stats_tokens is not None:
            settings["stats_tokens"] = config.stats_tokens
        self.runner = BatchRunner(
            lm,
            self.suite,
            config.seed,
            settings,
            self._snippets(),
            progress=progress,
            reuse_targets=config.reuse_targets,
            group_targets=config.group_targets,
        )
        self.run_settings = {spec.key: self._resolved_settings(spec) for spec in self.specs}
        self._check_run_settings()
        config_path = self.out / "config.json"
        if not config_path.exists():  # written once the settings proved usable
            config_path.write_text(json.dumps(resume_key, indent=2) + "\n")

    def _check_run_settings(self) -> None:
        """settings.json keeps each run's resolved settings. A run that has records must resume with the same
        settings (a preset chosen since, a changed default): its records would otherwise mix two settings."""
        path = self.out / "settings.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        with_records = runs_on_file(self.cases_file)
        changed = {
            run: sorted(k for k in set(old[run]) | set(now) if old[run].get(k) != now.get(k))
            for run, now in self.run_settings.items()
            if run in old and run in with_records and old[run] != now
        }
        unknown = sorted(run for run in self.run_settings if run in with_records and run not in old)
        if unknown:
            warnings.warn(
                f"{self.out} holds records of {', '.join(unknown)} from before kvedit recorded each run's "
                "settings (settings.json): they are kept as if made with today's "
                f"({settings_line({r: self.run_settings[r] for r in unknown})}); remove their lines from "
                "cases.jsonl to redo them if a preset has changed since",
                stacklevel=2,
            )
        if changed:
            detail = "; ".join(
                f"{run}: {', '.join(f'{k} {old[run].get(k)} -> {self.run_settings[run].get(k)}' for k in keys)}"
                for run, keys in changed.items()
            )
            raise BenchError(
                f"{self.out} holds records of runs made with other settings ({detail}); remove those "
                "runs' lines from cases.jsonl to redo them, or use another --out"
            )
        path.write_text(json.dumps(old | self.run_settings, indent=2) + "\n")

    def _snippets(self) -> AttributeSnippets | None:
        """Consistency resources when the cases have generation prompts and attribute ids."""
        if not any(case_edits(c)[0].generation_prompts and case_edits(c)[0].attribute for c in self.cases):
            return None
        try:
            return load_attribute_snippets()
        except (DatasetError, OSError) as e:
            warnings.warn(f"consistency is not computed (absent in the results): {e}", stacklevel=2)
            return None

    def _check_resume(self, key: dict[str, Any]) -> None:
        path = self.out / "config.json"
        if path.exists():
            old = json.loads(path.read_text())
            if "dataset_sha256" not in old:  # written before datasets were keyed by content
                warnings.warn(
                    f"{path} predates content keys; assuming {self.config.dataset} is unchanged "
                    "and recording its hash now",
                    stacklevel=3,
                )
                path.write_text(json.dumps(old | {"dataset_sha256": key["dataset_sha256"]}, indent=2) + "\n")
                old["dataset_sha256"] = key["dataset_sha256"]
            old.setdefault("skip", 0)  # folders written before --skip existed skipped nothing
            # before --suite, the suite followed the records (zsRE when none had target_true): every folder that
            # still loads without an error was scored with the suite chosen now
            old.setdefault("suite", key["suite"])
            old.setdefault("compute_dtype", "float32")  # folders from before --compute-dtype ran in float32
            diff = sorted(k for k in key if old.get(k) != key[k])
            if diff == ["dataset_sha256"]:
                raise BenchError(
                    f"{self.out} holds results for another version of {self.config.dataset}: the file's "
                    "content changed since they were written; use another --out"
                )
            if diff:
                raise BenchError(
                    f"{self.out} holds a run with other settings ({', '.join(diff)}: "
                    f"{[old.get(k) for k in diff]} vs {[key[k] for k in diff]}); use another --out"
                )

    def _select_cases(self) -> tuple[list[Any], dict[str, Any]]:
        requests, n, skip = self.requests, self.config.n, self.config.skip
        info: dict[str, Any] = {"dataset_records": len(requests)}
        if self.config.known_only:
            path = self.out / "known.json"
            if path.exists():
                kept_ids = json.loads(path.read_text())["kept_case_ids"]
            else:
                try:
                    flags = self.suite.known_flags(self.lm, requests)
                except ValueError as err:  # e.g. CounterFact's rule on cases without target_true
                    raise BenchError(str(err)) from None
                kept_ids = [r.case_id for r, keep in zip(requests, flags) if keep]
                path.write_text(
                    json.dumps({"scored": len(requests), "kept": len(kept_ids), "kept_case_ids": kept_ids}) + "\n"
                )
            kept = set(kept_ids)
            requests = [r for r in requests if r.case_id in kept]
            info |= {
                "known_kept": len(requests),
                "known_fraction": len(requests) / len(self.requests),
                "known_rule": self.suite.known_rule,
            }
        if skip:
            info["skipped"] = min(skip, len(requests))
            requests = requests[skip:]
        if n is not None and n > len(requests):
            warnings.warn(
                f"--n {n} but only {len(requests)} cases are available after --skip {skip}; using them all",
                stacklevel=2,
            )
        cases = list(requests[:n])
        if skip and not cases:
            raise BenchError(
                f"no cases left: --skip {skip} leaves none of the {info.get('known_kept', len(self.requests))}"
            )
        info["cases"] = len(cases)
        return cases, info

    # ------------------------------------------------------------------ evaluation

    def _evaluate_unedited(self, cases: Sequence[Any], chunk: int = 10) -> None:
        """The unedited model's records of `cases`, `chunk` cases at a time, each chunk appended as it finishes (a
        kill keeps the finished chunks; generation-scored sets take minutes per chunk)."""
        for start in tqdm(range(0, len(cases), chunk), desc="unedited", unit="chunk", disable=not self.progress):
            part = cases[start : start + chunk]
            records = [m | {"run": "unedited", "method": "unedited"} for m in self.runner.evaluate(part)]
            self.runner.unedited_predictions |= neighborhood_predictions(records, self.suite)
            add_unchanged(records, self.runner.unedited_predictions, self.suite)
            append_records(self.cases_file, records)

    def _predict_unedited(self, cases: Sequence[Any]) -> None:
        """Unedited argmax ids (locality) for cases scored before cases.jsonl kept them (held in memory)."""
        if not cases:
            return
        self.runner.unedited_predictions |= neighborhood_predictions(
            self.suite.case_metrics(self.lm, cases), self.suite
        )

    # ------------------------------------------------------------------ running

    def run(self, ray: "RaySettings | None" = None, on_progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """Run all missing work, then write and return the summary (also written after each run that did work,
        on Ray as its last batch comes back, marked incomplete until the last).

        ray: spread the batches over Ray workers (`kvedit.bench.ray`); sequential runs stay in this
        process. on_progress: called with the worker pool after each batch a worker finishes.
        """
        if ray is not None and self.config.group_targets:
            raise BenchError("--group-targets optimises in this process; drop it or --ray")
        existing = load_cases_file(self.cases_file)
        done = {(r["run"], r["case_id"]) for r in existing}
        self.runner.unedited_predictions = neighborhood_predictions(
            [r for r in existing if r["run"] == "unedited"], self.suite
        )
        edits_pending = any((s.key, c.case_id) not in done for s in self.specs for c in self.cases)
        if edits_pending:
            self._predict_unedited(
                [
                    c
                    for c in self.cases
                    if ("unedited", c.case_id) in done and c.case_id not in self.runner.unedited_predictions
                ]
            )
        self._evaluate_unedited([c for c in self.cases if ("unedited", c.case_id) not in done])
        if ray is not None:
            self._run_distributed(ray, done, on_progress)
        for spec in tqdm(self.specs, desc="runs", unit="run", disable=not self.progress or len(self.specs) == 1):
            ran = (spec.sequential or ray is None) and any((spec.key, c.case_id) not in done for c in self.cases)
            if spec.sequential:
                self._run_sequential(spec, done)
            elif ray is None:
                self._run_batches(spec, done)
            if ran and spec is not self.specs[-1]:
                self.write_summary()  # a long bench's finished runs can be read (and reported) while it goes on
        return self.write_summary()

    def _pending(self, spec: RunSpec, done: Done) -> list[tuple[int, list[Any]]]:
        return [(i, b) for i, b in enumerate(self._batches(spec)) if any((spec.key, r.case_id) not in done for r in b)]

    def _append_new(self, spec: RunSpec, records: Sequence[dict[str, Any]], done: Done) -> None:
        """Append the records of cases this run has not recorded yet (a resumed batch's others are kept)."""
        append_records(self.cases_file, [r for r in records if (spec.key, r["case_id"]) not in done])

    def _run_distributed(self, ray: "RaySettings", done: Done, on_progress: Callable[[Any], None] | None) -> None:
        """Every non-sequential run's pending batches on Ray workers; statistics prepared here, once."""
        from .ray import WorkerPool

        tasks = []
        for spec in self.specs:
            if spec.sequential:
                if self.progress:
                    tqdm.write(f"{spec.key}: sequential runs edit one model in order; this run stays in this process")
                continue
            pending = self._pending(spec, done)
            if pending:
                self.runner.prepare(spec)
            tasks += [(spec, index, batch) for index, batch in pending]
        if not tasks:
            return
        batches_left = Counter(spec.key for spec, _, _ in tasks)

        def on_records(spec: RunSpec, records: list[dict[str, Any]]) -> None:
            self._append_new(spec, records, done)
            batches_left[spec.key] -= 1
            if batches_left[spec.key] == 0 and any(batches_left.values()):
                self.write_summary()  # this run is whole: readable (and reportable) while the others go on

        pool = WorkerPool(ray, self.runner)
        try:
            pool.run(tasks, self.runner.unedited_predictions, on_records, on_progress, progress=self.progress)
        finally:
            pool.close()

    def _batches(self, spec: RunSpec) -> list[list[Any]]:
        b = spec.batch_size
        return [self.cases[i : i + b] for i in range(0, len(self.cases), b)]

    def _run_batches(self, spec: RunSpec, done: Done) -> None:
        batches = self._pending(spec, done)
        if batches:
            self.runner.prepare(spec)
            self.runner.optimize_targets_ahead(spec, [batch for _, batch in batches])
        for index, batch in tqdm(batches, desc=spec.key, unit="batch", disable=not self.progress, leave=False):
            self._append_new(spec, self.runner.run_batch(spec, batch, index), done)

    def _run_sequential(self, spec: RunSpec, done: Done) -> None:
        """Batches applied one after another, measured after each and resumable at any batch (`SequentialRun`:
        state/<run>/ keeps the chain of weights and the history; sequence.jsonl the per-batch records)."""
        SequentialRun(self, spec).run(done)

    # ------------------------------------------------------------------ summaries

    def runs(self) -> dict[str, list[dict[str, Any]]]:
        """Records per run for the selected cases, first record per case (in case order)."""
        order = {c.case_id: i for i, c in enumerate(self.cases)}
        runs: dict[str, dict[Any, dict[str, Any]]] = {}
        for record in load_cases_file(self.cases_file):
            if record["case_id"] in order:
                runs.setdefault(record["run"], {}).setdefault(record["case_id"], record)
        # this config's runs first, then any other run the folder holds (earlier invocations)
        wanted = list(dict.fromkeys(["unedited", *(s.key for s in self.specs), *runs]))
        return {name: sorted(runs[name].values(), key=lambda r: order[r["case_id"]]) for name in wanted if name in runs}

    def write_summary(self) -> dict[str, Any]:
        runs = self.runs()
        specs = {s.key: s for s in self.specs}
        summaries = {}
        for name, records in runs.items():
            spec = specs.get(name)
            first = records[0]
            setting = (
                asdict(spec) if spec else {k: first.get(k) for k in ("method", "layer", "batch_size", "sequential")}
            )
            summaries[name] = summarize_run(records, self.suite, seed=self.config.seed) | setting
        expected = {"unedited", *specs, *runs}  # a run this config asks for and has not started is missing
        complete = all(len(runs.get(name, ())) == len(self.cases) for name in expected)
        edited = {k: v for k, v in runs.items() if k != "unedited"}
        path = self.out / "settings.json"  # every run's, this invocation's and earlier ones'
        known = (json.loads(path.read_text()) if path.exists() else {}) | self.run_settings
        settings = {name: known[name] for name in edited if name in known}
        summary = {
            "model": self.lm.name,
            "dataset": self.config.dataset,
            "suite": self.suite.name,
            "title": self.title(),
            "metric_titles": self.suite.metric_titles(),
            "cases": self.filter_info,
            "complete": complete,
            "runs": summaries,
            "comparisons": compare_runs(edited, self.suite, seed=self.config.seed),
            "settings": settings,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "summary.csv").write_text(summary_csv(summaries, self.suite))
        tables = [self.title(), markdown_table(summaries, self.suite)] + [settings_line(settings)] * bool(settings)
        tables += [line] if (line := reuse_line(runs)) else []
        if (easyedit := easyedit_table(summaries, self.suite)) is not None:
            tables += [
                "Under EasyEdit's definitions (token accuracy; locality = predictions unchanged by the edit):",
                easyedit,
            ]
        (self.out / "table.md").write_text("\n\n".join(tables))
        return summary

    def _resolved_settings(self, spec: RunSpec) -> dict[str, Any]:
        """The settings a run's edits use, as resolved for this model (preset row, layers, λ, lr, …)."""
        hp = make_settings(self.lm, spec.method, **self.runner.edit_kwargs(spec))
        return json.loads(json.dumps(asdict(hp), default=str))

    def title(self) -> str:
        info = self.filter_info
        known = (
            f", known to the unedited model ({info['known_kept']} of {info['dataset_records']})"
            if "known_kept" in info
            else ""
        )
        data = dataset_title(self.config.dataset, self.suite.name)
        return f"{data} on {self.lm.name}: {info['cases']} cases{known}; means × 100, ± half the 95 % interval"
