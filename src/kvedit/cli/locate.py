"""Locating commands: `analyze trace` (causal tracing) and `analyze neurons` (knowledge neurons)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from .common import add_model_args, load, non_negative_int, positive_int
from .folders import results_folder


def unit_fraction(text: str) -> float:
    """Parse a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def trace_kinds(text: str) -> tuple[str, ...]:
    """Parse `residual,ffn` into the states causal tracing restores."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in ("residual", "ffn", "attn") for k in kinds) or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"expected distinct kinds out of residual, ffn, attn; got {text!r}")
    return kinds


def print_files(files) -> None:
    """One line naming the files a command wrote."""
    print("wrote " + ", ".join(str(f) for f in files))


def add_locate_parsers(asub: argparse._SubParsersAction) -> None:
    """`analyze trace` and `analyze neurons` under the `analyze` subcommands."""
    tr = asub.add_parser(
        "trace",
        help="causal tracing (ROME): which states carry a fact, per token and layer, "
        "restoring the residual stream, FFN or attention output",
    )
    tr.add_argument(
        "--dataset",
        required=True,
        help="facts with their true object (any format kvedit loads, e.g. CounterFact); facts the model "
        "does not predict are skipped, as ROME does",
    )
    tr.add_argument("--n", type=positive_int, default=200, help="facts to trace (default 200)")
    tr.add_argument(
        "--kinds",
        type=trace_kinds,
        default=("residual", "ffn", "attn"),
        help="states to restore: residual, ffn, attn (comma-separated; default all three)",
    )
    tr.add_argument("--samples", type=positive_int, default=10, help="noisy copies per fact (default 10, ROME's)")
    tr.add_argument(
        "--window",
        type=positive_int,
        default=10,
        help="layers restored at once for ffn and attn (default 10, ROME's [l−5, l+5))",
    )
    tr.add_argument("--plots", type=non_negative_int, default=3, help="facts drawn as heat maps (default 3)")

    kn = asub.add_parser(
        "neurons",
        help="knowledge neurons (Dai et al.): the memories each fact's answer depends "
        "on, by integrated gradients, and what suppressing them does",
    )
    kn.add_argument(
        "--dataset",
        required=True,
        help="facts with their true object (any format kvedit loads); each is asked by its rewrite "
        "prompt and its paraphrases",
    )
    kn.add_argument("--n", type=positive_int, default=100, help="facts (default 100)")
    kn.add_argument(
        "--all-facts",
        action="store_true",
        help="also facts the model does not know (default: only those with P(true) > P(new))",
    )
    kn.add_argument("--steps", type=positive_int, default=20, help="integration steps (default 20, the paper's)")
    kn.add_argument(
        "--threshold",
        type=unit_fraction,
        default=0.2,
        help="coarse neurons: attribution ≥ this × the prompt's largest (default 0.2)",
    )
    kn.add_argument(
        "--bag-ratio",
        type=unit_fraction,
        default=0.7,
        help="knowledge neurons: coarse in at least this share of the fact's prompts (default 0.7)",
    )

    for p in (tr, kn):
        p.add_argument(
            "--out",
            type=results_folder("analyze"),
            required=True,
            help="results folder (one with the same settings resumes: finished facts are kept)",
        )
        add_model_args(p)


def cmd_trace(args: argparse.Namespace) -> int:
    from ..analysis.trace_effects import trace_facts, write_trace_results
    from ..data.loaders import load_requests
    from ..editing.registry import make_settings

    if not Path(args.dataset).is_file():
        raise FileNotFoundError(f"--dataset {args.dataset} is not a file")
    requests = load_requests(args.dataset)
    lm = load(args)
    marks = {}
    for method in ("rome", "memit"):  # where the editors' presets edit, drawn beside the effects
        try:
            marks[method.upper()] = list(getattr(make_settings(lm, method), "layers", ()))
        except ValueError:  # no preset fits this model (e.g. its layers are fewer than the family's)
            pass
    facts = trace_facts(lm, args.out, requests, args.n, args.samples, args.window, args.kinds, source=str(args.dataset))
    if not facts:
        raise ValueError(
            f"the model predicts the true object of none of the {len(requests)} facts in "
            f"{args.dataset}; nothing to trace"
        )
    files = write_trace_results(args.out, facts, lm.name, marks, args.plots)
    print(files[0].read_text())
    print_files(files)
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    from ..analysis.neuron_runs import find_neurons, write_neuron_results
    from ..data.loaders import load_requests
    from ..evaluation.known import first_known

    if not Path(args.dataset).is_file():
        raise FileNotFoundError(f"--dataset {args.dataset} is not a file")
    requests = load_requests(args.dataset)
    lm = load(args)
    if not args.all_facts:
        kept, read = first_known(lm, requests, args.n)
        print(f"known-fact filter: {len(kept)} facts with P(true) > P(new) in the first {read}")
        requests = kept
    records = find_neurons(lm, args.out, requests[: args.n], args.steps, args.threshold, args.bag_ratio)
    files = write_neuron_results(args.out, records, lm.name, lm.num_layers)
    print(files[0].read_text())
    print_files(files)
    return 0


#: `analyze` subcommand -> its handler
LOCATE_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"trace": cmd_trace, "neurons": cmd_neurons}
