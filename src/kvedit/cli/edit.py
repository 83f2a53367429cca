"""Commands on one model: models, edit, apply, revert, stats."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from .common import add_model_args, layer_list, load

LAYERS_HELP = "edit layers, e.g. 3 or 2,3 (negative numbers count from the last layer: -1 is the last)"


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    from ..editing.method_names import METHOD_NAMES

    sub.add_parser("models", help="list the supported model families")

    e = sub.add_parser("edit", help="edit one fact and show p(new), p(true) before and after")
    e.add_argument("--method", default="ft-keys", choices=METHOD_NAMES, help="editing method")
    e.add_argument("--prompt", required=True, help="relation template with {} for the subject")
    e.add_argument("--subject", required=True)
    e.add_argument("--new", required=True, dest="target_new", help="the new object")
    e.add_argument(
        "--true", default=None, dest="target_true", help="the current object (default: the model's own answer)"
    )
    e.add_argument("--paraphrase", action="append", default=[], help="a paraphrase prompt (repeatable)")
    e.add_argument(
        "--neighborhood", action="append", default=[], help="a prompt whose answer must stay --true (repeatable)"
    )
    e.add_argument("--layers", type=layer_list, default=None, help=LAYERS_HELP)
    e.add_argument(
        "--preset",
        default=None,
        help="hyperparameter preset (ft: default, qiu2024, ft-l; rome/memit/pmet: per family, default: the model's)",
    )
    e.add_argument("--lr", type=float, default=None)
    e.add_argument("--steps", type=int, default=None, dest="max_steps", help="step limit")
    e.add_argument(
        "--stats",
        default=None,
        dest="stats_source",
        help="rome/memit/pmet: corpus for key statistics ('self', a .txt file or folder, hf:<dataset>)",
    )
    e.add_argument(
        "--stats-tokens",
        type=int,
        default=None,
        help="rome/memit/pmet: tokens of statistics corpus (default: the preset's)",
    )
    e.add_argument(
        "--save",
        type=Path,
        default=None,
        help="write the patch: a .safetensors file (suffix added if none) and its .json metadata beside it",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_model_args(e)

    for name, verb in (("apply", "apply a patch to"), ("revert", "revert a patch from")):
        a = sub.add_parser(name, help=f"{verb} a model and save the result")
        a.add_argument("patch", type=Path)
        a.add_argument(
            "--out",
            type=Path,
            required=True,
            help="new (or empty) folder to write the resulting model to; never kvedit's cache",
        )
        add_model_args(a)

    st = sub.add_parser("stats", help="compute (or load from the cache) key second moments E[kkᵀ] for layers")
    st.add_argument("--layers", type=layer_list, required=True, help="layers, e.g. 3,4,5,6,7")
    st.add_argument(
        "--source", default="self", help="'self' (model-sampled text), a .txt file or folder, or hf:<dataset>"
    )
    st.add_argument("--tokens", type=int, default=20_000, help="tokens to read (default 20000)")
    st.add_argument(
        "--kind", default="values", choices=["values", "attn_out"], help="whose input: FFN values or attention output"
    )
    add_model_args(st)
    return {"models": cmd_models, "edit": cmd_edit, "apply": cmd_patch, "revert": cmd_patch, "stats": cmd_stats}


def cmd_edit(args: argparse.Namespace) -> int:
    from ..data.requests import EditRequest
    from ..editing.delta import patch_paths
    from ..editing.registry import METHODS, edit, make_settings
    from ..evaluation.probe import greedy_answer, target_probabilities

    if not METHODS[args.method].uses_statistics and (args.stats_source or args.stats_tokens):
        readers = ", ".join(n for n, m in METHODS.items() if m.uses_statistics)
        raise ValueError(
            f"--stats and --stats-tokens apply to the methods that read key statistics ({readers}); "
            f"{args.method} needs none"
        )
    overrides = dict(
        preset=args.preset,
        layers=args.layers,
        lr=args.lr,
        max_steps=args.max_steps,
        stats_source=args.stats_source,
        stats_tokens=args.stats_tokens,
    )
    # everything that needs no model is checked before loading it
    make_settings(None, args.method, **overrides)
    save = patch_paths(args.save)[0] if args.save else None
    probe = EditRequest(args.prompt, args.subject, args.target_new)
    lm = load(args)
    settings = make_settings(lm, args.method, **overrides)  # layers and modules, before any scoring; `edit` uses them
    target_true = args.target_true or greedy_answer(lm, probe.rewrite_prompt)
    request = EditRequest(
        args.prompt,
        args.subject,
        args.target_new,
        target_true,
        paraphrase_prompts=tuple(args.paraphrase),
        neighborhood_prompts=tuple(args.neighborhood),
    )
    before = target_probabilities(lm, request)
    delta = edit(lm, request, args.method, hparams=settings)
    after = target_probabilities(lm, request)
    if save:
        delta.save(save)
    result, layers = delta.metadata["result"], delta.metadata["layers"]
    if args.json:
        print(
            json.dumps(
                {
                    "method": args.method,
                    "prompt": request.rewrite_prompt,
                    "target_new": request.target_new,
                    "target_true": request.target_true,
                    "before": before["efficacy"][0],
                    "after": after["efficacy"][0],
                    "paraphrase": {"before": before.get("paraphrase", []), "after": after.get("paraphrase", [])},
                    "neighborhood": {"before": before.get("neighborhood", []), "after": after.get("neighborhood", [])},
                    "time_s": result["time_s"],
                    "steps": result["steps"],
                    "layers": layers,
                    "patch": str(save) if save else None,
                }
            )
        )
        return 0
    print(
        f"{args.method} on {lm.name}, layers {layers}: {result['steps']} steps in {result['time_s']:.2f} s"
        + (f"; patch written to {save}" if save else "")
    )
    print(f"p = e^(−mean token NLL) of ' {request.target_new}' (new) and ' {request.target_true}' (true)")
    rows = [("rewrite", request.rewrite_prompt, "efficacy")]
    rows += [("paraphrase", p, "paraphrase") for p in request.paraphrase_prompts]
    rows += [("neighborhood", p, "neighborhood") for p in request.neighborhood_prompts]
    counters: dict[str, int] = {}
    width = min(60, max(len(p) for _, p, _ in rows))
    print(
        f"{'kind':<12} {'prompt':<{width}}  {'new before':>10} {'new after':>10} {'true before':>11} {'true after':>10}"
    )
    for kind, prompt, group in rows:
        i = counters[group] = counters.get(group, -1) + 1
        b, a = before[group][i], after[group][i]
        shown = prompt if len(prompt) <= width else prompt[: width - 1] + "…"
        print(
            f"{kind:<12} {shown:<{width}}  {b['target_new']:>10.4f} {a['target_new']:>10.4f} "
            f"{b['target_true']:>11.4f} {a['target_true']:>10.4f}"
        )
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from ..editing.delta import WeightDelta
    from ..models.saving import check_output_folder, save_model_folder

    check_output_folder(args.out)
    delta = WeightDelta.load(args.patch)  # verified (checksum, structure, finite) before anything is written
    lm = load(args)
    (delta.apply if args.command == "apply" else delta.revert)(lm)
    save_model_folder(lm, args.out)
    verb = "applied to" if args.command == "apply" else "reverted from"
    print(
        f"patch {args.patch} ({delta.metadata.get('method')}, {len(delta.names)} matrices) {verb} "
        f"{lm.name}; model written to {args.out}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models.architectures import ARCHITECTURES

    print(f"{'model_type':<10} {'family':<20} {'keys':<32} {'values':<18} {'attention out':<24} notes")
    for key, a in ARCHITECTURES.items():
        notes = [
            n
            for n, on in (
                ("Conv1D (transposed)", a.transposed),
                ("parallel attn+FFN", a.parallel),
                ("masked LM", a.objective == "masked"),
            )
            if on
        ]
        keys = ", ".join(a.keys.values())
        print(f"{key:<10} {a.family:<20} {keys:<32} {a.values:<18} {a.attn_out:<24} {'; '.join(notes)}")
    from ..models.compute import bf16_support

    support = bf16_support("cpu")
    print(
        f"\nbfloat16 matrix units: {'yes' if support.units else 'no'} ({support.detail}); --compute-dtype bfloat16 "
        f"{'is available' if support.units else 'is refused here'}"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    from ..editing.stats import key_statistics

    lm = load(args)
    start = time.perf_counter()
    stats = key_statistics(lm, args.layers, args.source, args.tokens, kind=args.kind)
    elapsed = time.perf_counter() - start
    for layer, st in sorted(stats.items()):
        mom2 = st.mom2
        print(f"layer {layer:>3}: {st.count} tokens, E[kkᵀ] {tuple(mom2.shape)}, trace {float(mom2.trace()):.4g}")
    print(f"{elapsed:.1f} s (cached results load in well under a second)")
    return 0
