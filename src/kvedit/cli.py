"""Command line: argument parsing only; everything else is the library's."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = "Run `kvedit COMMAND --help` for a command's options."


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 3,4,5; got {text!r}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")


def build_parser() -> argparse.ArgumentParser:
    from .editing.registry import METHODS

    parser = argparse.ArgumentParser(prog="kvedit", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list the supported model families")

    e = sub.add_parser("edit", help="edit one fact and show p(new), p(true) before and after")
    e.add_argument("--method", default="ft-keys", choices=list(METHODS), help="editing method")
    e.add_argument("--prompt", required=True, help="relation template with {} for the subject")
    e.add_argument("--subject", required=True)
    e.add_argument("--new", required=True, dest="target_new", help="the new object")
    e.add_argument("--true", default=None, dest="target_true", help="the current object (default: the model's own answer)")
    e.add_argument("--paraphrase", action="append", default=[], help="a paraphrase prompt (repeatable)")
    e.add_argument("--neighborhood", action="append", default=[], help="a prompt whose answer must stay --true (repeatable)")
    e.add_argument("--layers", type=_layers, default=None, help="edit layers, e.g. 3 or 2,3")
    e.add_argument("--preset", default=None, help="hyperparameter preset (ft: default, qiu2024, ft-l; rome/memit/pmet: per family, default: the model's)")
    e.add_argument("--lr", type=float, default=None)
    e.add_argument("--steps", type=int, default=None, dest="max_steps", help="step limit")
    e.add_argument("--stats", default=None, dest="stats_source",
                   help="rome/memit/pmet: corpus for key statistics ('self', a .txt file or folder, hf:<dataset>)")
    e.add_argument("--save", type=Path, default=None, help="write the patch (.safetensors + .json)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _model_args(e)

    for name, verb in (("apply", "apply a patch to"), ("revert", "revert a patch from")):
        a = sub.add_parser(name, help=f"{verb} a model and save the result")
        a.add_argument("patch", type=Path)
        a.add_argument("--out", type=Path, required=True, help="folder to write the resulting model to")
        _model_args(a)

    st = sub.add_parser("stats", help="compute (or load from the cache) key second moments E[kkᵀ] for layers")
    st.add_argument("--layers", type=_layers, required=True, help="layers, e.g. 3,4,5,6,7")
    st.add_argument("--source", default="self", help="'self' (model-sampled text), a .txt file or folder, or hf:<dataset>")
    st.add_argument("--tokens", type=int, default=20_000, help="tokens to read (default 20000)")
    st.add_argument("--kind", default="values", choices=["values", "attn_out"], help="whose input: FFN values or attention output")
    _model_args(st)

    d = sub.add_parser("demo", help="the main job: FT on keys vs values over the built-in demo facts")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    d.add_argument("--methods", default="ft-keys,ft-values",
                   help=f"comma-separated methods out of {', '.join(METHODS)} (default: ft-keys,ft-values)")
    d.add_argument("--n", type=int, default=None, help="use only the first N demo facts")
    _model_args(d)

    b = sub.add_parser("bench", help="edit, evaluate and revert over CounterFact or zsRE; resumable")
    b.add_argument("--dataset", required=True,
                   help="counterfact, multi_counterfact or zsre (downloaded to the cache), or a file path")
    b.add_argument("--methods", default=None, help="comma-separated methods (default ft-keys,ft-values)")
    b.add_argument("--n", type=int, default=None, help="use the first N cases (after --known-only)")
    b.add_argument("--batch-size", type=_layers, default=None, dest="batch_sizes",
                   help="requests per edit call, e.g. 1, 10 or 1,10 (default 1)")
    b.add_argument("--sequential", action="store_true", help="keep each batch's edit and add the next on top")
    b.add_argument("--known-only", action="store_true", help="keep cases the unedited model gets right")
    b.add_argument("--layers", type=_layers, default=None, help="run each method at each of these layers (a sweep)")
    b.add_argument("--preset", default=None, choices=["table3"],
                   help="table3: the seed's Table 3 protocol, FT on keys vs values with 1 and 10 counterfacts")
    b.add_argument("--stats", default=None, dest="stats_source", help="rome/memit/pmet statistics corpus")
    b.add_argument("--stats-tokens", type=int, default=None, help="tokens of statistics corpus")
    b.add_argument("--seed", type=int, default=0, help="seed of generation sampling and bootstrap intervals")
    b.add_argument("--out", type=Path, required=True, help="output folder; an existing one is resumed")
    _model_args(b)

    r = sub.add_parser("report", help="Markdown report with plots from a bench folder")
    r.add_argument("folder", type=Path)
    return parser


def _load(args: argparse.Namespace):
    from .models.loading import load_model

    return load_model(args.model, dtype=args.dtype)


def _model_answer(lm, prompt: str) -> str:
    """The model's own greedy answer to `prompt`: its first generated word."""
    import torch

    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    words = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).split()
    if not words:
        raise SystemExit(f"the model gives no answer to {prompt!r}; pass --true")
    return words[0].strip(".,;:!?\"'")


def _probabilities(lm, request) -> dict[str, list[dict[str, float]]]:
    from .evaluation.counterfact import counterfact_case_metrics

    case = counterfact_case_metrics(lm, [request])[0]
    return {
        group: [{"target_new": a, "target_true": b} for a, b in zip(case[f"{group}_p_new"], case[f"{group}_p_true"])]
        for group in ("efficacy", "paraphrase", "neighborhood")
        if f"{group}_p_new" in case
    }


def cmd_edit(args: argparse.Namespace) -> int:
    from .data.requests import EditRequest
    from .editing.registry import edit

    lm = _load(args)
    probe = EditRequest(args.prompt, args.subject, args.target_new)  # validates before any work
    target_true = args.target_true or _model_answer(lm, probe.rewrite_prompt)
    request = EditRequest(
        args.prompt, args.subject, args.target_new, target_true,
        paraphrase_prompts=tuple(args.paraphrase), neighborhood_prompts=tuple(args.neighborhood),
    )
    before = _probabilities(lm, request)
    extra = {"stats_source": args.stats_source} if args.stats_source else {}
    if extra and args.method.startswith("ft-"):
        raise ValueError("--stats applies to rome, memit and pmet; fine-tuning needs no statistics")
    delta = edit(lm, request, args.method, preset=args.preset, layers=args.layers, lr=args.lr,
                 max_steps=args.max_steps, **extra)
    after = _probabilities(lm, request)
    if args.save:
        delta.save(args.save)
    result = delta.metadata["result"]
    if args.json:
        print(json.dumps({
            "method": args.method, "prompt": request.rewrite_prompt,
            "target_new": request.target_new, "target_true": request.target_true,
            "before": before["efficacy"][0], "after": after["efficacy"][0],
            "paraphrase": {"before": before.get("paraphrase", []), "after": after.get("paraphrase", [])},
            "neighborhood": {"before": before.get("neighborhood", []), "after": after.get("neighborhood", [])},
            "time_s": result["time_s"], "steps": result["steps"],
            "layers": delta.metadata["hparams"]["layers"], "patch": str(args.save) if args.save else None,
        }))
        return 0
    print(f"{args.method} on {lm.name}, layers {delta.metadata['hparams']['layers']}: "
          f"{result['steps']} steps in {result['time_s']:.2f} s"
          + (f"; patch written to {args.save}" if args.save else ""))
    print(f"p = e^(−mean token NLL) of ' {request.target_new}' (new) and ' {request.target_true}' (true)")
    rows = [("rewrite", request.rewrite_prompt, "efficacy")]
    rows += [("paraphrase", p, "paraphrase") for p in request.paraphrase_prompts]
    rows += [("neighborhood", p, "neighborhood") for p in request.neighborhood_prompts]
    counters: dict[str, int] = {}
    width = min(60, max(len(p) for _, p, _ in rows))
    print(f"{'kind':<12} {'prompt':<{width}}  {'new before':>10} {'new after':>10} {'true before':>11} {'true after':>10}")
    for kind, prompt, group in rows:
        i = counters[group] = counters.get(group, -1) + 1
        b, a = before[group][i], after[group][i]
        shown = prompt if len(prompt) <= width else prompt[: width - 1] + "…"
        print(f"{kind:<12} {shown:<{width}}  {b['target_new']:>10.4f} {a['target_new']:>10.4f} "
              f"{b['target_true']:>11.4f} {a['target_true']:>10.4f}")
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from .editing.delta import WeightDelta

    delta = WeightDelta.load(args.patch)
    lm = _load(args)
    (delta.apply if args.command == "apply" else delta.revert)(lm)
    args.out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(args.out)
    lm.tokenizer.save_pretrained(args.out)
    verb = "applied to" if args.command == "apply" else "reverted from"
    print(f"patch {args.patch} ({delta.metadata.get('method')}, {len(delta.names)} matrices) {verb} "
          f"{lm.name}; model written to {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.architectures import ARCHITECTURES

    print(f"{'model_type':<10} {'family':<20} {'keys':<32} {'values':<18} {'attention out':<24} notes")
    for key, a in ARCHITECTURES.items():
        notes = [n for n, on in (("Conv1D (transposed)", a.transposed), ("parallel attn+FFN", a.parallel),
                                  ("masked LM", a.objective == "masked")) if on]
        keys = ", ".join(a.keys.values())
        print(f"{key:<10} {a.family:<20} {keys:<32} {a.values:<18} {a.attn_out:<24} {'; '.join(notes)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.demo_facts import demo_requests
    from .demo import format_table, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    requests = demo_requests()[: args.n] if args.n else demo_requests()
    lm = _load(args)
    summaries = run_demo(lm, requests, methods, args.out)
    print(format_table(summaries, f"Editing {len(requests)} demo facts on {lm.name}, one at a time (means × 100)"))
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'cases.jsonl'}, {args.out / 'table.md'}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import time

    from .editing.stats import key_statistics

    lm = _load(args)
    start = time.perf_counter()
    stats = key_statistics(lm, args.layers, args.source, args.tokens, kind=args.kind)
    elapsed = time.perf_counter() - start
    for layer, st in sorted(stats.items()):
        mom2 = st.mom2
        print(f"layer {layer:>3}: {st.count} tokens, E[kkᵀ] {tuple(mom2.shape)}, trace {float(mom2.trace()):.4g}")
    print(f"{elapsed:.1f} s (cached results load in well under a second)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import PRESETS, Bench, BenchConfig

    preset = PRESETS[args.preset] if args.preset else {}
    methods = args.methods.split(",") if args.methods else preset.get("methods", ("ft-keys", "ft-values"))
    config = BenchConfig(
        dataset=args.dataset, methods=tuple(m.strip() for m in methods if m.strip()), n=args.n,
        batch_sizes=args.batch_sizes or preset.get("batch_sizes", (1,)), sequential=args.sequential,
        known_only=args.known_only, layers=args.layers, stats_source=args.stats_source,
        stats_tokens=args.stats_tokens, seed=args.seed,
    )
    config.specs()  # check the settings before loading anything
    bench = Bench(_load(args), config, args.out)
    info = bench.filter_info
    if "known_kept" in info:
        print(f"known-fact filter: {info['known_kept']} of {info['dataset_records']} cases kept; "
              f"using {info['cases']}")
    summary = bench.run()
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out / 'cases.jsonl'}, summary.json, summary.csv, table.md"
          + ("" if summary["complete"] else " (incomplete)"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.folder)
    pngs = sorted(p.name for p in args.folder.glob("*.png"))
    print(f"wrote {path} with {', '.join(pngs)}")
    return 0


COMMANDS = {"models": cmd_models, "edit": cmd_edit, "apply": cmd_patch, "revert": cmd_patch, "demo": cmd_demo, "stats": cmd_stats,
            "bench": cmd_bench, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading from the cache takes well under a second
    from .data.requests import RequestError
    from .editing.delta import EditError, PatchMismatchError
    from .models.architectures import UnsupportedModelError
    from .models.loading import ModelLoadError

    try:
        return COMMANDS[args.command](args)
    except (RequestError, EditError, PatchMismatchError, UnsupportedModelError, ModelLoadError, FileNotFoundError,
            ValueError) as err:
        print(f"kvedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the model's weights were restored", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
