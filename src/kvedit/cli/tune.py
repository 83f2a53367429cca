"""`kvedit tune`: LoRA / IA3 adapters by FFN role on classification tasks or Alpaca → MMLU; resumable."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .common import add_model_args, layer_list, load
from .folders import results_folder

TARGET_HELP = (
    "comma-separated target sets; a set is roles joined by '+': attn-qv (attention q and v; the fused "
    "q/k/v projection in GPT-2 and GPT-NeoX), key-gate, key-up (gated FFNs), key (non-gated FFNs), keys "
    "(all key modules), values (down projection); e.g. attn-qv,attn-qv+key-up,keys,values"
)


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    from ..tuning.presets import IA3_CAVEAT, PRESETS

    t = sub.add_parser("tune", help="train adapters by FFN role (attention q/v, keys, values) and compare them")
    t.add_argument("--targets", default="attn-qv,keys,values", help=TARGET_HELP + " (default attn-qv,keys,values)")
    t.add_argument("--layers", type=layer_list, default=None, help="adapt only these layers (default: all)")
    data = t.add_argument_group("data (one of: --tasks, --task-file, --instruct)")
    data.add_argument(
        "--tasks",
        default=None,
        help="built-in tasks trained jointly: cb, boolq, copa, qnli, race, 20ng (comma-separated)",
    )
    data.add_argument(
        "--data-dir", type=Path, default=None, help="folder with one sub-folder per task (e.g. ../shared/data/tasks)"
    )
    data.add_argument(
        "--task-source",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="read TASK from PATH (a split folder or one file in the official or llm-foundry format)",
    )
    data.add_argument("--task-file", type=Path, default=None, help="your own task: a JSONL/JSON/CSV/TSV file")
    data.add_argument(
        "--task-name",
        default=None,
        help="what the tables call --task-file's task (default: the file's name without suffix)",
    )
    data.add_argument(
        "--task-test-file", type=Path, default=None, help="its test file (default: a seeded split of --task-file)"
    )
    data.add_argument(
        "--template",
        default=None,
        help="prompt template naming the file's fields, ending where the label goes, e.g. "
        "'### Review:{text} ### Sentiment:'",
    )
    data.add_argument("--label-field", default="label", help="the field holding the label (default label)")
    data.add_argument(
        "--label-words",
        default=None,
        help="label words: 'negative,positive' or value=word pairs '0=negative,1=positive'",
    )
    data.add_argument("--instruct", type=Path, default=None, help="Alpaca-format JSON for instruction tuning")
    data.add_argument("--mmlu", type=Path, default=None, help="zero-shot MMLU JSON lines evaluating --instruct runs")
    data.add_argument("--train-n", type=int, default=5000, help="first N clean training records per task (5000)")
    data.add_argument(
        "--test-n",
        type=int,
        default=1000,
        help="first N clean test records per task, or MMLU questions over all subjects (1000)",
    )
    tr = t.add_argument_group("training")
    tr.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="default: CPU-sized (lr 1e-3, 1 epoch, 8 rows/step, loss on label); qiu2024: the seed's "
        "(lr 2e-4, 5 epochs, 4×16 rows/step, packing to 512, loss on prompt + label)",
    )
    tr.add_argument(
        "--adapter-type",
        default=None,
        choices=["lora", "ia3"],
        dest="adapter_kind",
        help="lora (default) or ia3. " + IA3_CAVEAT,
    )
    tr.add_argument("--rank", type=int, default=None, help="LoRA rank (8)")
    tr.add_argument("--alpha", type=float, default=None, help="LoRA alpha (16)")
    tr.add_argument("--dropout", type=float, default=None, help="LoRA dropout (0.1)")
    tr.add_argument("--lr", type=float, default=None, help="learning rate")
    tr.add_argument("--epochs", type=float, default=None, help="passes over the training data")
    tr.add_argument("--steps", type=int, default=None, dest="max_steps", help="optimiser steps (overrides --epochs)")
    tr.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass")
    tr.add_argument("--grad-accum", type=int, default=None, help="forward passes per optimiser step")
    tr.add_argument("--max-length", type=int, default=None, help="tokens per training sequence")
    tr.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pack examples into full-length rows (else pad batches of similar length)",
    )
    tr.add_argument("--loss-on", choices=["all", "label"], default=None, help="tokens that carry the loss")
    tr.add_argument("--checkpoint-every", type=int, default=None, help="optimiser steps between checkpoints (25)")
    tr.add_argument("--seed", type=int, default=0, help="seed of adapter init, data order, dropout and splits")
    tr.add_argument(
        "--4bit",
        action="store_true",
        dest="four_bit",
        help="load the base model in 4-bit NF4 (bitsandbytes; needs a CUDA GPU)",
    )
    t.add_argument("--no-untuned", action="store_true", help="skip evaluating the model without an adapter")
    t.add_argument("--eval-batch-size", type=int, default=8, help="test examples per forward pass (8)")
    t.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="a saved adapter folder (runs/<target>/adapter): evaluate it on the data instead of training",
    )
    t.add_argument(
        "--merge-out",
        type=Path,
        default=None,
        help="with --adapter: write the base model with the adapter merged into its weights here",
    )
    t.add_argument("--out", type=results_folder("tune"), default=None, help="output folder; an existing one is resumed")
    add_model_args(t)
    return {"tune": cmd_tune}


def _check_args(args: argparse.Namespace) -> None:
    """Argument errors, raised before the model loads or anything is written."""
    if args.compute_dtype != "float32":
        raise ValueError(
            f"--compute-dtype {args.compute_dtype}: kvedit tune trains and evaluates adapters in the "
            "weights' own precision (--dtype); --compute-dtype applies to the editors and to mining"
        )
    modes = [
        m for m, v in (("--tasks", args.tasks), ("--task-file", args.task_file), ("--instruct", args.instruct)) if v
    ]
    if args.merge_out is not None:
        if args.adapter is None:
            raise ValueError("--merge-out needs --adapter (the saved adapter to merge)")
        return
    if not [t for t in args.targets.split(",") if t.strip()]:
        raise ValueError(f"--targets {args.targets!r} names no target set; expected e.g. attn-qv,keys,values")
    if len(modes) != 1:
        raise ValueError(f"give exactly one of --tasks, --task-file or --instruct (got {modes or 'none'})")
    if args.out is None:
        raise ValueError("--out is required (the results folder)")
    if args.instruct and args.mmlu is None:
        raise ValueError("--instruct needs --mmlu (the zero-shot MMLU file that measures it)")
    if args.task_name is not None and (not args.task_file or not args.task_name.strip()):
        raise ValueError("--task-name names a --task-file's task: give it with --task-file, and not empty")
    if args.task_file and (not args.template or not args.label_words):
        raise ValueError("--task-file needs --template (naming the file's fields) and --label-words")
    for opt in ("train_n", "test_n", "eval_batch_size"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be a positive integer, got {getattr(args, opt)}")


def _data(args: argparse.Namespace):
    from ..tuning.runner import TuneData, classification_data, instruct_data
    from ..tuning.tasks import load_user_task, parse_label_words

    if args.instruct:
        return instruct_data(args.instruct, args.mmlu, args.train_n, args.test_n)
    if args.task_file:
        task = load_user_task(
            args.task_file,
            args.template,
            args.label_field,
            parse_label_words(args.label_words),
            args.train_n,
            args.test_n,
            args.task_test_file,
            args.seed,
            name=args.task_name,
        )
        return TuneData(task.train, {task.name: task}, notes=[f"{task.name}: {task.note}"])
    sources: dict[str, str | Path] = {}
    for item in args.task_source:
        if "=" not in item:
            raise ValueError(f"--task-source expects TASK=PATH, got {item!r}")
        name, path = item.split("=", 1)
        sources[name.strip()] = Path(path)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return classification_data(tasks, args.data_dir, args.train_n, args.test_n, args.seed, sources)


def cmd_tune(args: argparse.Namespace) -> int:
    from ..tuning.presets import preset
    from ..tuning.quantize import require_4bit

    _check_args(args)
    if args.four_bit:
        require_4bit()
    config = preset(
        args.preset,
        adapter=args.adapter_kind,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        packing=args.packing,
        loss_on=args.loss_on,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    data = None if args.merge_out is not None else _data(args)  # data errors before the model loads
    if args.four_bit:
        from ..tuning.quantize import load_4bit

        lm = load_4bit(args.model)
    else:
        lm = load(args)
    from ..tuning import runner

    if args.adapter is not None and args.merge_out is not None:
        from ..tuning.adapters import merge_adapter

        path = merge_adapter(lm, args.adapter, args.merge_out)
        print(f"wrote the merged model to {path}")
        return 0
    assert data is not None, "data is read unless --merge-out is given"
    if args.adapter is not None:
        summary = runner.evaluate_adapter(lm, args.adapter, data, args.out, args.eval_batch_size)
    else:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        summary = runner.run_tune(
            lm,
            targets,
            data,
            args.out,
            config,
            layers=args.layers,
            untuned=not args.no_untuned,
            eval_batch_size=args.eval_batch_size,
        )
    print((args.out / "table.md").read_text())
    print(
        f"wrote {args.out / 'summary.json'}, summary.csv, table.md, predictions.jsonl"
        + ("" if summary["complete"] else " (incomplete: run again to resume)")
    )
    return 0
