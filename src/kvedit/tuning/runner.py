"""Run several target sets on the same data, write per-example records, resume a killed run, summarise.

Output folder:
- `config.json`: model fingerprint, data manifest, training settings, layers (a resumed run must match).
- `runs/<target>/`: `checkpoint/` while training, then `adapter/` (peft files + `kvedit_adapter.json` with the
  targets and settings + `data_manifest.json`) and `train.json` (loss per step, tokens, wall time, peak memory,
  trainable parameters).
- `predictions.jsonl`: one line per run and test example, flushed per run.
- `summary.json`, `summary.csv`, `table.md` (see `tables.py`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.jsonl import append_jsonl, read_jsonl
from ..models.lm import LM
from .adapters import adapter_metadata, load_adapter, save_adapter
from .evaluate import predict
from .instruct import MMLUItem, load_alpaca, load_mmlu, mmlu_predictions
from .presets import TrainConfig
from .tables import run_dir_name, summarize_tune, write_tables
from .targets import TargetSet, attach_adapter, describe, detach_adapter, parameter_counts, parse_targets
from .tasks import TASKS, Example, TaskData, load_task
from .train import PeakMemory, train_adapter

UNTUNED = "untuned"


@dataclass
class TuneData:
    """Training examples and what the runs are measured on: classification test sets, or MMLU."""

    train: list[Example]
    tasks: dict[str, TaskData] = field(default_factory=dict)  # classification: per task train/test/labels
    mmlu: list[MMLUItem] = field(default_factory=list)  # instruction tuning: MMLU questions
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "instruct" if self.mmlu else "classification"

    @property
    def test(self) -> list[Example]:
        return [e for t in self.tasks.values() for e in t.test]

    def manifest(self) -> dict[str, Any]:
        """What the adapters saw and what they are tested on: counts, sources, notes, a hash of every text."""
        digest = hashlib.sha256()
        for e in [*self.train, *self.test]:
            digest.update(f"{e.uid}\x00{e.text}\x00".encode())
        for it in self.mmlu:
            digest.update(f"{it.uid}\x00{it.prompt}{it.answer}\x00".encode())
        return {
            "kind": self.kind,
            "train": len(self.train),
            "tasks": {
                n: {
                    "train": len(t.train),
                    "test": len(t.test),
                    "source": t.source,
                    "note": t.note,
                    "labels": list(t.labels),
                }
                for n, t in self.tasks.items()
            },
            "mmlu": {"questions": len(self.mmlu), "subjects": len({it.subject for it in self.mmlu})}
            if self.mmlu
            else None,
            "notes": self.notes,
            "sha256": digest.hexdigest(),
        }

    def check(self) -> None:
        if not self.train:
            raise ValueError("no training examples: every task's training split is empty")
        if self.kind == "classification" and not self.test:
            raise ValueError("no test examples: every task's test split is empty")


def classification_data(
    tasks: Sequence[str],
    data_dir: str | Path | None,
    n_train: int,
    n_test: int,
    seed: int = 0,
    sources: dict[str, str | Path] | None = None,
) -> TuneData:
    """Built-in tasks (`cb`, `boolq`, `copa`, `qnli`, `race`, `20ng`) trained jointly: each read from
    `sources[task]` (a file or folder) or `data_dir/<task>/`; the first `n_train`/`n_test` clean records."""
    sources = dict(sources or {})
    unknown = [t for t in [*tasks, *sources] if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; built-in tasks: {', '.join(TASKS)} (or give a task file)")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"--train-n and --test-n must be positive, got {n_train} and {n_test}")
    loaded = {}
    for task in tasks:
        source = sources.get(task) or (Path(data_dir) / task if data_dir is not None else None)
        if source is None:
            raise ValueError(f"task {task}: no source; pass --data-dir or {task}=PATH")
        loaded[task] = load_task(TASKS[task], source, n_train, n_test, seed)
    return TuneData(
        [e for t in loaded.values() for e in t.train], loaded, notes=[f"{t}: {d.note}" for t, d in loaded.items()]
    )


def instruct_data(alpaca: str | Path, mmlu: str | Path, n_train: int, n_test: int | None) -> TuneData:
    """Alpaca-format training examples, evaluated by zero-shot MMLU."""
    items = load_mmlu(mmlu, n_test)
    return TuneData(
        load_alpaca(alpaca, n_train),
        mmlu=items,
        notes=[f"MMLU: {len(items)} questions over {len({i.subject for i in items})} subjects"],
    )


def evaluate_model(lm: LM, data: TuneData, batch_size: int, desc: str) -> list[dict[str, Any]]:
    """Per-example records of the model as it is now (adapter attached or not)."""
    if data.kind == "instruct":
        return mmlu_predictions(lm, data.mmlu, batch_size, desc=desc)
    labels = {n: t.labels for n, t in data.tasks.items()}
    return [p.record() for p in predict(lm, data.test, labels, batch_size=batch_size, desc=desc)]


def _settings(lm: LM, data: TuneData, config: TrainConfig, layers: Sequence[int] | None) -> dict[str, Any]:
    return {
        "model": lm.name,
        "model_fingerprint": lm.base_fingerprint,
        "data": data.manifest(),
        "train_config": config.to_dict(),
        "layers": None if layers is None else list(layers),
    }


def run_tune(
    lm: LM,
    targets: Sequence[str],
    data: TuneData,
    out: str | Path,
    config: TrainConfig,
    layers: Sequence[int] | None = None,
    untuned: bool = True,
    eval_batch_size: int = 8,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one adapter per target set (plus the untuned model) on `data`; write `out`.

    Every target set is resolved (bad roles or layers raise) before anything is written. Rerunning on the same
    folder resumes: finished runs are kept, a run cut during training continues from its last checkpoint.
    `stop_after` (tests) stops each training after that many steps, as a kill would.
    """
    data.check()
    resolved = [parse_targets(lm, spec, layers) for spec in targets]
    names = ([UNTUNED] if untuned else []) + [t.name for t in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"target sets repeat: {list(targets)}")
    out = Path(out)
    settings = _settings(lm, data, config, layers)
    config_path = out / "config.json"
    if config_path.exists():
        old = json.loads(config_path.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)}); use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(settings | {"targets": names}, indent=1))
    for note in data.notes:
        log(note)
    pred_path = out / "predictions.jsonl"
    expected = len(data.mmlu) if data.kind == "instruct" else len(data.test)
    done = {n for n in names if _finished(pred_path, n, expected)}

    if untuned and UNTUNED not in done:
        log("evaluating the untuned model")
        _write_predictions(pred_path, UNTUNED, evaluate_model(lm, data, eval_batch_size, UNTUNED))
        (out / "runs" / UNTUNED).mkdir(parents=True, exist_ok=True)
        trainable, total = parameter_counts(lm.model)
        (out / "runs" / UNTUNED / "train.json").write_text(json.dumps({"trainable": 0, "total": total}))
    for target in resolved:
        if target.name in done or _finished(pred_path, target.name, expected):
            log(f"{target.name}: already evaluated, kept")
            continue
        _run_one(lm, target, data, out, config, eval_batch_size, log, pred_path, stop_after)
    summary = summarize_tune(out, data.kind)
    write_tables(out, summary)
    return summary


def _finished(path: Path, run: str, expected: int) -> bool:
    """Whether `predictions.jsonl` holds every test record of `run` (re-read: another process may add runs)."""
    return sum(1 for r in read_jsonl(path) if r["run"] == run) == expected


def _write_predictions(path: Path, run: str, records: list[dict[str, Any]]) -> None:
    """Append the run's records in one write (processes sharing a folder on different target sets do not
    clash); rewrite the file only to drop an earlier partial copy of the same run."""
    old = read_jsonl(path)
    if any(r["run"] == run for r in old):
        kept = "".join(json.dumps(r) + "\n" for r in old if r["run"] != run)
        path.write_text(kept + "".join(json.dumps({"run": run} | r) + "\n" for r in records))
        return
    append_jsonl(path, [{"run": run} | r for r in records], sync=False)


def _run_one(
    lm: LM,
    target: TargetSet,
    data: TuneData,
    out: Path,
    config: TrainConfig,
    eval_batch_size: int,
    log: Callable[[str], None],
    pred_path: Path,
    stop_after: int | None,
) -> None:
    folder = out / "runs" / run_dir_name(target.name)
    folder.mkdir(parents=True, exist_ok=True)
    peft_model = attach_adapter(lm, target, config.adapter, config.rank, config.alpha, config.dropout, config.seed)
    try:
        trainable, total = parameter_counts(peft_model)
        log(describe(target, trainable, total))
        adapter_dir = folder / "adapter"
        train_path = folder / "train.json"
        with PeakMemory() as memory:
            if adapter_dir.exists() and train_path.exists():
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(peft_model, load_file(adapter_dir / "adapter_model.safetensors"))
                record = json.loads(train_path.read_text())
            else:
                began = time.perf_counter()
                result = train_adapter(
                    lm, peft_model, data.train, config, folder, desc=target.name, stop_after=stop_after
                )
                if not result.finished:
                    return  # stopped early (`stop_after`): the checkpoint waits for the next call
                save_adapter(peft_model, adapter_dir, target, config, lm, data.manifest())
                record = {
                    "trainable": trainable,
                    "total": total,
                    "losses": result.losses,
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "train_time_s": result.time_s,
                    "tokens_per_s": result.tokens / result.time_s if result.time_s else None,
                    "session_time_s": time.perf_counter() - began,
                    "modules": list(target.modules),
                    "notes": list(target.notes),
                }
            started = time.perf_counter()
            records = evaluate_model(lm, data, eval_batch_size, target.name)
            record["eval_time_s"] = time.perf_counter() - started
        record["peak_memory_mb"] = max(record.get("peak_memory_mb") or 0.0, memory.peak_mb)
        train_path.write_text(json.dumps(record))
        _write_predictions(pred_path, target.name, records)
        log(f"{target.name}: trained {record['steps']} steps in {record['train_time_s']:.0f} s")
    finally:
        lm.model = detach_adapter(peft_model)


def evaluate_adapter(
    lm: LM, adapter: str | Path, data: TuneData, out: str | Path, eval_batch_size: int = 8
) -> dict[str, Any]:
    """Evaluate a saved adapter on `data` into `out` (a run named after the adapter's targets)."""
    data.check()
    meta = adapter_metadata(adapter)
    name = f"adapter:{meta.get('targets', Path(adapter).name)}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            {
                "model": lm.name,
                "model_fingerprint": lm.base_fingerprint,
                "data": data.manifest(),
                "train_config": meta.get("train_config", {}),
                "layers": meta.get("layers"),
                "targets": [name],
            },
            indent=1,
        )
    )
    peft_model = load_adapter(lm, adapter)
    try:
        records = evaluate_model(lm, data, eval_batch_size, name)
        trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n or "ia3_" in n)
        total = sum(p.numel() for p in peft_model.parameters())
    finally:
        lm.model = detach_adapter(peft_model)
    folder = out / "runs" / run_dir_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps({"trainable": trainable, "total": total}))
    _write_predictions(out / "predictions.jsonl", name, records)
    summary = summarize_tune(out, data.kind)
    write_tables(out, summary)
    return summary
