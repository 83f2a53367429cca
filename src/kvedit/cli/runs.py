"""Commands that run many cases and write a results folder: demo, bench, report, compare."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .common import add_model_args, layer_list, load, method_list, non_negative_int, positive_ints
from .folders import results_folder

#: `--suite` choices: the names of `evaluation.suites.SUITES` (kept here so that parsing imports no torch;
#: tests/test_bench_propagation.py checks they agree)
SUITE_NAMES = ("counterfact", "zsre", "counterfact-portability", "zsre-portability", "knowedit", "mquake")


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    from ..bench.lifelong import DEFAULT_GENERAL_TASKS, DEFAULT_GENERAL_TEXT
    from ..editing.method_names import METHOD_NAMES
    from ..extras import RAY_INSTALL

    d = sub.add_parser(
        "demo",
        help="the main job: FT on keys vs values over the built-in demo facts "
        "(a bench run over kvedit/data/demo_facts.json)",
    )
    d.add_argument(
        "--out",
        type=results_folder("demo"),
        default=Path("runs/demo"),
        help="output folder (default runs/demo); an existing one is resumed, as with bench",
    )
    d.add_argument(
        "--methods",
        type=method_list,
        default=("ft-keys", "ft-values"),
        help=f"comma-separated methods out of {', '.join(METHOD_NAMES)} (default: ft-keys,ft-values)",
    )
    d.add_argument("--n", type=int, default=None, help="use only the first N demo facts")
    add_model_args(d)

    b = sub.add_parser(
        "bench",
        help="edit, evaluate and revert over CounterFact, zsRE or a propagation set "
        "(portability, KnowEdit, MQuAKE); resumable",
    )
    b.add_argument(
        "--dataset",
        required=True,
        help="counterfact, multi_counterfact or zsre (downloaded to the cache), or a file path: kvedit's "
        "format (docs/requests.md), CounterFact/zsRE/EasyEdit files, or a propagation set "
        "(CounterFact or zsRE portability, KnowEdit, MQuAKE: docs/propagation.md), told apart by "
        "their fields",
    )
    b.add_argument(
        "--suite",
        choices=SUITE_NAMES,
        default=None,
        help="metrics to score with: counterfact (P(new) vs P(true); every record needs target_true), "
        "zsre (token accuracy; neighbourhood prompts need neighborhood_target), or a propagation "
        "set's (counterfact-portability, zsre-portability, knowedit, mquake: its own metrics plus "
        "portability or multi-hop). Default: the dataset's own (zsre for MEND zsRE, the set's for a "
        "propagation file, counterfact for the rest, kvedit's files included)",
    )
    b.add_argument(
        "--methods", type=method_list, default=None, help="comma-separated methods (default ft-keys,ft-values)"
    )
    b.add_argument("--n", type=int, default=None, help="use the first N cases (after --known-only and --skip)")
    b.add_argument(
        "--skip",
        type=non_negative_int,
        default=0,
        help="leave out the first SKIP cases (after --known-only), e.g. the tuning split of select_presets",
    )
    b.add_argument(
        "--batch-size",
        type=positive_ints,
        default=None,
        dest="batch_sizes",
        help="requests per edit call, e.g. 1, 10 or 1,10 (default 1)",
    )
    b.add_argument("--sequential", action="store_true", help="keep each batch's edit and add the next on top")
    b.add_argument(
        "--known-only",
        action="store_true",
        help="keep cases the unedited model knows: it prefers target_true to target_new on the rewrite "
        "prompt (MQuAKE: the old answer to the new on one of the questions; docs/propagation.md)",
    )
    lifelong = b.add_argument_group("measured after each --sequential batch (docs/lifelong.md)")
    lifelong.add_argument(
        "--retention-sample",
        type=int,
        default=200,
        help="earlier edits re-scored after each batch (all while fewer; default 200)",
    )
    lifelong.add_argument(
        "--specificity-sample",
        type=int,
        default=100,
        help="cases whose neighbourhood prompts are the fixed unrelated facts (default 100)",
    )
    lifelong.add_argument(
        "--general-text",
        default=DEFAULT_GENERAL_TEXT,
        help=f"held-out text for perplexity (default {DEFAULT_GENERAL_TEXT})",
    )
    lifelong.add_argument(
        "--general-tasks",
        default=DEFAULT_GENERAL_TASKS,
        help=f"classification tasks for zero-shot label ranking (default {DEFAULT_GENERAL_TASKS})",
    )
    lifelong.add_argument("--general-tokens", type=int, default=10_000, help="tokens of the text (default 10000)")
    lifelong.add_argument("--general-window", type=int, default=256, help="tokens per perplexity window (default 256)")
    lifelong.add_argument("--general-per-task", type=int, default=50, help="examples per task (default 50)")
    lifelong.add_argument(
        "--general-every",
        type=int,
        default=1,
        help="probe general ability after every k-th batch and the last (default 1: every batch; "
        "one probe costs minutes on 2 cores)",
    )
    lifelong.add_argument(
        "--retention-every",
        type=int,
        default=1,
        help="measure retention of earlier edits and specificity after every k-th batch and the last (default 1; "
        "≈ 1 min per check on the bundled model: with --batch-size 1, e.g. 50)",
    )
    lifelong.add_argument("--no-general", action="store_true", help="no general-ability probe")
    lifelong.add_argument("--no-general-tasks", action="store_true", help="perplexity only, no label ranking")
    b.add_argument(
        "--layers",
        type=layer_list,
        default=None,
        help="run each method at each of these layers (a sweep; -1 is the last layer)",
    )
    b.add_argument(
        "--preset",
        default=None,
        choices=["table3"],
        help="table3: the seed's Table 3 protocol, FT on keys vs values with 1 and 10 counterfacts",
    )
    b.add_argument("--stats", default=None, dest="stats_source", help="rome/memit/pmet statistics corpus")
    b.add_argument("--stats-tokens", type=int, default=None, help="tokens of statistics corpus")
    b.add_argument("--seed", type=int, default=0, help="seed of generation sampling and bootstrap intervals")
    b.add_argument(
        "--reuse-targets",
        action="store_true",
        help="runs that are not --sequential take the target vectors (v*, z, δ) optimised before for the "
        "same case, settings and model from the cache, e.g. PMET's ablations PMET's, a ×100 run the "
        "one-at-a-time run's; edit times add the stored optimisation time",
    )
    b.add_argument(
        "--group-targets",
        action="store_true",
        help="with --reuse-targets (implied): before a run's one-at-a-time edits, optimise their target "
        "vectors in groups of 16 (the same vectors; 1.7× less time per request at 2 threads); edit times count each "
        "case's share of its group's time (ROME, MEMIT, PMET, AlphaEdit; not with --ray)",
    )
    b.add_argument(
        "--out", type=results_folder("bench"), required=True, help="output folder; an existing one is resumed"
    )
    b.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="spread the batches over Ray workers: no ADDRESS starts a local Ray instance, 'auto' "
        "joins this machine's cluster, host:6379 or ray://host:10001 a head node "
        f"(needs {RAY_INSTALL})",
    )
    b.add_argument("--workers", type=int, default=2, help="with --ray: number of workers (default 2)")
    b.add_argument("--worker-cpus", type=float, default=1.0, help="with --ray: CPUs per worker (default 1)")
    b.add_argument("--worker-gpus", type=float, default=0.0, help="with --ray: GPUs per worker (default 0)")
    add_model_args(b)

    r = sub.add_parser("report", help="Markdown report with plots from a bench, demo or tune folder")
    r.add_argument("folder", type=Path)

    c = sub.add_parser(
        "compare",
        help="the same paired comparisons side by side across bench folders "
        "(models, datasets): compare.md, compare.json, compare.png",
    )
    c.add_argument("folders", type=Path, nargs="+", help="bench folders, e.g. one per model and dataset")
    c.add_argument("--out", type=results_folder("compare"), required=True, help="output folder")
    c.add_argument(
        "--pairs",
        default=None,
        help="A:B run pairs, comma-separated, e.g. 'ft-keys:ft-values,pmet x100:memit x100' "
        "(default: the seed papers' comparisons)",
    )
    c.add_argument(
        "--labels", default=None, help="comma-separated column labels, one per folder (default: model · dataset)"
    )
    return {"demo": cmd_demo, "bench": cmd_bench, "report": cmd_report, "compare": cmd_compare}


def _ray_settings(args: argparse.Namespace):
    """The --ray settings, checked (Ray installed, sizes valid) before anything loads; None without --ray."""
    if getattr(args, "ray", None) is None:
        return None
    from ..bench.ray import RaySettings, require_ray

    require_ray()
    return RaySettings(
        address=None if args.ray == "local" else args.ray,
        workers=args.workers,
        worker_cpus=args.worker_cpus,
        worker_gpus=args.worker_gpus,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        compute_dtype=args.compute_dtype,
    ).check()


def _run_bench(args: argparse.Namespace, config) -> int:
    """Check the settings and the folder, load the model, run what the folder lacks, print the table."""
    from ..bench.harness import Bench

    ray = None

    def load_after_checks():  # called by Bench once --out passed its check, before anything else loads
        nonlocal ray
        ray = _ray_settings(args)
        return load(args)

    bench = Bench(load_after_checks, config, args.out)  # the config checked its settings when it was made
    info = bench.filter_info
    if "known_kept" in info:
        print(f"known-fact filter: {info['known_kept']} of {info['dataset_records']} cases kept; using {info['cases']}")
    summary = bench.run(ray=ray)
    print((args.out / "table.md").read_text())
    print(
        f"wrote {args.out / 'cases.jsonl'}, summary.json, summary.csv, table.md"
        + ("" if summary["complete"] else " (incomplete)")
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..bench.config import BenchConfig
    from ..data.demo_facts import demo_facts_path

    return _run_bench(args, BenchConfig(dataset=str(demo_facts_path()), methods=args.methods, n=args.n))


def _lifelong(args: argparse.Namespace):
    """The per-batch measurements of a --sequential bench (general ability off with --no-general)."""
    from ..bench.lifelong import LifelongSettings

    general = not args.no_general and args.sequential
    return LifelongSettings(
        retention_sample=args.retention_sample,
        specificity_sample=args.specificity_sample,
        general_text=args.general_text if general else None,
        general_tasks=args.general_tasks if general and not args.no_general_tasks else None,
        general_tokens=args.general_tokens,
        general_window=args.general_window,
        general_every=args.general_every,
        retention_every=args.retention_every,
        general_per_task=args.general_per_task,
        seed=args.seed,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.config import BENCH_PRESETS, BenchConfig

    preset = BENCH_PRESETS[args.preset] if args.preset else {}
    methods = args.methods or preset.get("methods", ("ft-keys", "ft-values"))
    return _run_bench(
        args,
        BenchConfig(
            dataset=args.dataset,
            methods=tuple(methods),
            n=args.n,
            skip=args.skip,
            batch_sizes=args.batch_sizes or preset.get("batch_sizes", (1,)),
            sequential=args.sequential,
            known_only=args.known_only,
            layers=args.layers,
            stats_source=args.stats_source,
            stats_tokens=args.stats_tokens,
            seed=args.seed,
            reuse_targets=args.reuse_targets or args.group_targets,
            group_targets=args.group_targets,
            suite=args.suite,
            lifelong=_lifelong(args),
        ),
    )


def cmd_report(args: argparse.Namespace) -> int:
    from ..reports.bench_report import write_report

    path = write_report(args.folder)
    pngs = sorted(p.name for p in args.folder.glob("*.png"))
    print(f"wrote {path} with {', '.join(pngs)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..reports.compare import SEED_PAIRS, parse_pairs, write_comparison

    pairs = parse_pairs(args.pairs) if args.pairs else SEED_PAIRS
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if all((Path(f) / "sequence.jsonl").is_file() for f in args.folders):  # sequential (lifelong) folders
        from ..reports.lifelong_report import write_lifelong_comparison

        lifelong = write_lifelong_comparison(args.folders, args.out, labels)
        print(lifelong.read_text())
        print(f"wrote {lifelong} and {lifelong.with_suffix('.json').name}")
        if args.pairs is None:
            return 0
    path = write_comparison(args.folders, args.out, pairs, labels, strict=args.pairs is not None)
    print(path.read_text())
    print(f"wrote {path}, {path.with_suffix('.json').name} and compare.png")
    return 0
