"""Analysis commands: `analyze triggers|values|layers|components|all` and `inspect` (`analyze trace|neurons`:
locate.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import add_model_args, layer_list, load, positive_int
from .folders import results_folder
from .locate import LOCATE_COMMANDS, add_locate_parsers, print_files


def key_list(text: str) -> tuple[tuple[int, int], ...]:
    """Parse `12:345` or `3:7,12:345` into (layer, memory) pairs."""
    try:
        pairs = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or p[1] < 0 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected LAYER:MEMORY pairs like 3:7,12:345; got {text!r}")
    return pairs  # type: ignore[return-value]


def _corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        default="self",
        help="text file, folder of .txt files, hf:<dataset> (needs a hub) or self (text the model "
        "samples itself; the default)",
    )
    p.add_argument("--max-length", type=positive_int, default=64, help="tokens per sentence at most (default 64)")


def _triggers_opts(p: argparse.ArgumentParser, tokens_flag: str = "--tokens") -> None:
    p.add_argument(
        tokens_flag,
        type=positive_int,
        default=100_000,
        dest="trigger_tokens",
        help="corpus tokens to mine (default 100000)",
    )
    p.add_argument("--k", type=positive_int, default=50, help="trigger examples kept per memory (default 50)")
    p.add_argument(
        "--rank",
        choices=["value", "abs"],
        default="value",
        help="rank prefixes by the signed coefficient (default) or by |coefficient|",
    )
    p.add_argument(
        "--keys",
        type=key_list,
        default=(),
        help="memories to write a page for, as LAYER:MEMORY pairs (default: a few random ones)",
    )
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=2048,
        help="mining: tokens per forward pass at most, padding included (default 2048); --batch-size "
        "caps the sentences (default 512 for mining)",
    )


def _layers_opts(p: argparse.ArgumentParser, tokens_flag: str = "--tokens") -> None:
    p.add_argument(
        tokens_flag,
        type=positive_int,
        default=2000,
        dest="layer_tokens",
        help="corpus tokens for the layer statistics (default 2000)",
    )
    p.add_argument(
        "--active-threshold",
        type=float,
        default=0.1,
        help="non-ReLU FFNs: a memory is active when |m|·‖v‖ ≥ this × the token's largest (default 0.1)",
    )


def _components_opts(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--dataset",
        required=required,
        default=None,
        help="CounterFact file whose rewrite prompts are used (any format kvedit loads)",
    )
    p.add_argument("--n", type=positive_int, default=200, help="prompts to use (default 200)")
    p.add_argument("--known-only", action="store_true", help="only prompts whose true object the model prefers")


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    a = sub.add_parser("analyze", help="Geva et al. analyses and PMET Fig. 2 into a results folder")
    asub = a.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    t = asub.add_parser("triggers", help="top-k trigger prefixes of every key, all layers in one pass")
    _corpus(t)
    _triggers_opts(t)
    t.add_argument(
        "--jsonl-examples",
        type=positive_int,
        default=10,
        help="examples per memory in the per-layer JSONL (default 10; all k stay in triggers.safetensors)",
    )

    v = asub.add_parser("values", help="each value vector's top tokens through the unembedding")
    v.add_argument("--k", type=positive_int, default=10, help="tokens per value (default 10)")
    v.add_argument("--keys", type=key_list, default=(), help="memories to show in values.md, as LAYER:MEMORY")

    l = asub.add_parser("layers", help="agreement, active memories, composition and logit-lens refinement per layer")
    _corpus(l)
    _layers_opts(l)

    c = asub.add_parser("components", help="attention vs FFN input/output similarity per layer (PMET Fig. 2)")
    _components_opts(c, required=True)

    al = asub.add_parser("all", help="triggers, values, layers (and components with --dataset) into one folder")
    _corpus(al)
    _triggers_opts(al, "--trigger-tokens")
    _layers_opts(al, "--layer-tokens")
    _components_opts(al, required=False)

    add_locate_parsers(asub)
    for p in (t, v, l, c, al):
        p.add_argument(
            "--out",
            type=results_folder("analyze"),
            required=True,
            help="results folder (mined triggers in it are reused)",
        )
        if p in (t, v):
            p.add_argument("--layers", type=layer_list, default=None, help="layers (default all)")
        if p in (v, l, al):
            p.add_argument(
                "--final-norm",
                action="store_true",
                help="read values and FFN outputs as E·norm(v) instead of E·v (the reference's choice)",
            )
        p.add_argument(
            "--batch-size",
            type=positive_int,
            default=None,
            help="sentences per forward pass (default: 512 for mining, 8 for layer statistics)",
        )
        add_model_args(p)

    i = sub.add_parser(
        "inspect",
        help="prompts: top memories, logit lens, interventions; or what a patch changed "
        "(several prompts share one model load)",
    )
    i.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts, e.g. 'The capital of France is'")
    i.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="a UTF-8 text file with one prompt per line (blank lines skipped), after any PROMPTs",
    )
    i.add_argument("--triggers", type=Path, default=None, help="a folder with mined triggers to show per memory")
    i.add_argument("--top", type=positive_int, default=10, help="memories per layer (default 10)")
    i.add_argument("--zero", action="append", default=[], metavar="L:i", help="switch memory i of layer L off")
    i.add_argument("--scale", action="append", default=[], metavar="L:i=F", help="multiply memory i of layer L by F")
    i.add_argument("--final-norm", action="store_true", help="read value tokens as E·norm(v)")
    i.add_argument("--patch", type=Path, default=None, help="a kvedit patch: show what it changed on this prompt")
    i.add_argument(
        "--neighborhood",
        action="append",
        default=[],
        metavar="PROMPT",
        help="with --patch: neighbourhood prompts (default: the patch's own)",
    )
    i.add_argument(
        "--out",
        type=results_folder("inspect"),
        default=None,
        help="also write inspect.json and inspect.md (or patch.*) here",
    )
    i.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    add_model_args(i)
    return {"analyze": cmd_analyze, "inspect": cmd_inspect}


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis import runs

    if args.analysis in LOCATE_COMMANDS:
        return LOCATE_COMMANDS[args.analysis](args)
    if args.analysis in ("components", "all") and args.dataset is not None and not Path(args.dataset).is_file():
        raise FileNotFoundError(f"--dataset {args.dataset} is not a file")
    threshold = getattr(args, "active_threshold", None)
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"--active-threshold must be in (0, 1], got {threshold}")
    lm = load(args)
    batch = args.batch_size
    if args.analysis in ("triggers", "all"):
        done = runs.analyze_triggers(
            lm,
            args.out,
            args.corpus,
            getattr(args, "layers", None),
            args.keys,
            args.k,
            args.trigger_tokens,
            args.max_length,
            batch or 512,
            args.rank,
            getattr(args, "jsonl_examples", 10),
            batch_tokens=args.batch_tokens,
        )
        print(
            f"triggers: {'reused' if done['reused'] else 'mined'} {done['tokens']} tokens, layers "
            f"{done['layers'][0]}–{done['layers'][-1]}; see {args.out / 'keys.html'} (or keys.md)"
        )
    projections = None
    if args.analysis in ("values", "all"):
        done = runs.analyze_values(
            lm,
            args.out,
            getattr(args, "layers", None),
            args.keys,
            getattr(args, "k", 10) if args.analysis == "values" else 10,
            args.final_norm,
        )
        print(f"values: see {args.out / 'values.md'}")
        projections = done["projections"] if args.analysis == "all" else None
    if args.analysis in ("layers", "all"):
        done = runs.analyze_layers(
            lm,
            args.out,
            args.corpus,
            args.layer_tokens,
            args.max_length,
            batch or 8,
            args.final_norm,
            args.active_threshold,
            projections=projections,
        )
        print((args.out / "layers.md").read_text())
        print_files(p for p in done["files"] if p.suffix == ".png")
    if args.analysis == "components" or (args.analysis == "all" and args.dataset):
        prompts = runs.counterfact_prompts(lm, args.dataset, args.n, args.known_only)
        note = f"the first {len(prompts)} rewrite prompts of {Path(args.dataset).name}" + (
            " the model gets right" if args.known_only else ""
        )
        done = runs.analyze_components(lm, args.out, prompts, note)
        print((args.out / "components.md").read_text())
        print_files(p for p in done["files"] if p.suffix == ".png")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..analysis.inspect import Intervention, inspect_markdown, inspect_prompt
    from ..analysis.patch_view import patch_markdown, patch_report
    from ..analysis.runs import triggers_in

    prompts = _inspect_prompts(args)
    interventions = [Intervention.parse(t, zero=True) for t in args.zero] + [Intervention.parse(t) for t in args.scale]
    if args.patch is not None and interventions:
        raise ValueError("--patch shows what a patch changed; --zero/--scale cannot be combined with it")
    if args.triggers is not None and not (args.triggers / "triggers.safetensors").is_file():
        raise FileNotFoundError(
            f"--triggers {args.triggers} holds no mined triggers; run `kvedit analyze triggers "
            f"--out {args.triggers}` first"
        )
    if args.patch is not None:
        from ..editing.delta import WeightDelta

        delta = WeightDelta.load(args.patch)
        lm = load(args)
        patch_page = patch_report(lm, delta, prompts, args.neighborhood, args.top, apply_final_norm=args.final_norm)
        report: dict[str, Any] | list[dict[str, Any]] = patch_page
        text, name = patch_markdown(patch_page), "patch"
    else:
        lm = load(args)
        triggers = triggers_in(args.triggers, lm) if args.triggers else None
        reports = [
            inspect_prompt(
                lm, prompt, args.top, triggers=triggers, apply_final_norm=args.final_norm, interventions=interventions
            )
            for prompt in _progress(prompts)
        ]
        report = reports[0] if len(reports) == 1 else reports  # one prompt: the page as before
        text, name = "\n".join(inspect_markdown(r) for r in reports), "inspect"
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (args.out / f"{name}.md").write_text(text)
    print(json.dumps(report, default=str) if args.json else text)
    return 0


def _inspect_prompts(args: argparse.Namespace) -> list[str]:
    """The PROMPT arguments, then --prompts-file's lines; at least one."""
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        from ..data.textfiles import read_utf8

        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file} is not a file")
        prompts += [line.strip() for line in read_utf8(args.prompts_file).splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-empty PROMPT (or --prompts-file with one prompt per line)")
    return prompts


def _progress(prompts: list[str]):
    """`prompts`, with a progress bar when there are several."""
    from tqdm.auto import tqdm

    return tqdm(prompts, desc="inspect", unit="prompt", disable=len(prompts) < 2)
