"""How much of a closed-form editor's optimised target survives into the edited weights.

ROME, MEMIT and PMET first optimise vectors added at the subject's last token (ROME's v* at the FFN output,
MEMIT's z on the residual stream, PMET's δ_a and δ_m at the attention and FFN outputs of the last edit layer),
then write them into weights. Per request this prints, as token accuracy of target_new on the rewrite prompt
(the zsRE efficacy definition; a fraction of the answer's tokens that are the argmax):

- reach: with every optimised vector added (no weight change), what the optimisation achieved;
- written only: with only the vectors the editor writes into weights added (PMET writes δ_m, not δ_a);
- edited: after the weight edit (the editor's efficacy);
- at clamp: requests whose vector ended at its norm bound (clamp_norm_factor · ‖init‖), per site;
- for MEMIT and PMET, the spread: the FFN remainder's norm as the first and the last edit layer see it (what the
  editor measures, in what reaches the residual stream), and the norm of all layers' shares summed over the first
  remainder's (1 when the layers together write exactly what was first missing).

Issue 13 used it to ask why PMET fails on zsRE while MEMIT does not (docs/seed-tables.md).

Usage: python benchmarks/target_reach.py [--model smollm2-135m] [--dataset PATH] [--n 20]
           [--variants memit,pmet,pmet:clamp_norm_factor=4,pmet-no-attn-delta] [--out results/target-reach.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvedit import edit, load_model
from kvedit.data.loaders import load_requests
from kvedit.editing.context import MEMIT_TEMPLATES, ROME_TEMPLATES, context_templates
from kvedit.editing.memit import spread_fraction
from kvedit.editing.pmet import PMETHyperParams
from kvedit.editing.registry import make_settings
from kvedit.editing.rome import ROMEHyperParams
from kvedit.editing.target_store import reused_targets
from kvedit.editing.targets import optimize_targets, subject_position
from kvedit.evaluation.scoring import score_targets
from kvedit.models.tracing import Addition, Site, Trace

DATA = Path(__file__).resolve().parents[2] / "shared/data/editing/zsre/zsre_mend_train-1k.json"


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """ "pmet:clamp_norm_factor=4;kl_factor=0.5" → ("pmet", {"clamp_norm_factor": 4.0, ...})."""
    method, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return method, overrides


def split_variants(text: str) -> list[str]:
    """Split the --variants list at commas outside brackets ("memit:layers=[6,7],pmet" → two variants)."""
    return [v for v in re.split(r",(?![^\[]*\])", text) if v]


def sites_of(settings: Any) -> tuple[list[Site], list[Site], tuple[tuple[int, int], ...]]:
    """(optimised sites, sites the editor writes into weights, context-template spec) as the editor uses them."""
    last = settings.layers[-1]
    if isinstance(settings, ROMEHyperParams):
        return [("ffn_out", last)], [("ffn_out", last)], ROME_TEMPLATES
    if isinstance(settings, PMETHyperParams):
        attn, ffn = ("attn_out", last), ("ffn_out", last)
        optimised = [attn, ffn] if settings.attn_delta else [ffn]
        return optimised, [attn, ffn] if settings.update_attn else [ffn], MEMIT_TEMPLATES
    return [("residual", last)], [("residual", last)], MEMIT_TEMPLATES


@torch.no_grad()
def token_accuracy(lm, request, additions: dict[Site, torch.Tensor]) -> float:
    """Fraction of target_new's tokens that are the argmax after the rewrite prompt, with `additions`
    `{site: [d]}` added at the subject's last token."""
    position = torch.tensor([subject_position(lm, request.prompt, request.subject)])
    add = {site: Addition(delta[None], position) for site, delta in additions.items()}
    with Trace(lm, add=add):  # scored as the bench scores zsRE efficacy
        return score_targets(lm, [request.rewrite_prompt], [request.target_new]).token_accuracy.item()


def measure(lm, requests, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    settings = make_settings(lm, method, **overrides)
    optimised, written, spec = sites_of(settings)
    templates = context_templates(lm, spec)
    rows = []
    for request in tqdm(requests, desc=method, leave=False):
        with reused_targets(lm):  # the edit below takes these very vectors instead of optimising again
            vectors, steps = optimize_targets(lm, [request], optimised, templates, settings.target_options())
            found = vectors[0]
            bound = {s: settings.clamp_norm_factor * found[s][0].norm() for s in optimised}
            reach = token_accuracy(lm, request, {s: found[s][1] for s in optimised})
            written_only = token_accuracy(lm, request, {s: found[s][1] for s in written})
            delta = edit(lm, request, method, **overrides)
        try:
            edited = token_accuracy(lm, request, {})
        finally:
            delta.revert(lm)
        rows.append(
            dict(
                case_id=request.case_id,
                steps=steps[0],
                reach=reach,
                written_only=written_only,
                edited=edited,
                at_clamp={s[0]: bool(found[s][1].norm() >= 0.99 * bound[s]) for s in optimised},
                **spread_of(delta.records, settings),
            )
        )
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    spread = {k: mean(k) for k in ("remainder_first", "remainder_last", "written_sum") if k in rows[0]}
    return dict(
        n=len(rows),
        reach=100 * mean("reach"),
        written_only=100 * mean("written_only"),
        edited=100 * mean("edited"),
        at_clamp={s[0]: sum(r["at_clamp"][s[0]] for r in rows) for s in optimised},
        ran_all_steps=sum(r["steps"] == settings.max_steps - 1 for r in rows),
        **spread,
        cases=rows,
    )


def spread_of(records: Any, settings: Any) -> dict[str, float]:
    """The FFN remainder's norm at the first and last edit layer, and ‖Σ layers' shares‖ / ‖first remainder‖
    (MEMIT and PMET; empty for ROME's single layer)."""
    layers = getattr(records, "ffn", records)
    if isinstance(settings, ROMEHyperParams) or not layers:
        return {}
    spread = settings.spread if isinstance(settings, PMETHyperParams) else "even"
    shares = sum(r.remaining * spread_fraction(i, len(layers), spread) for i, r in enumerate(layers))
    first = layers[0].remaining.norm().item()
    return dict(
        remainder_first=first,
        remainder_last=layers[-1].remaining.norm().item(),
        written_sum=shares.norm().item() / first,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(DATA), help="any dataset kvedit loads (default: zsRE)")
    parser.add_argument("--n", type=int, default=20, help="first N valid records")
    parser.add_argument(
        "--variants",
        default="memit,pmet,pmet:clamp_norm_factor=4,pmet-no-attn-delta,pmet-no-attn-delta:clamp_norm_factor=4",
        help="comma-separated METHOD[:KEY=VALUE;...] (settings over the model's preset)",
    )
    parser.add_argument("--out", type=Path, help="also write every case as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    requests = load_requests(args.dataset, limit=args.n, skip_invalid=True)
    results = {}
    print(f"{lm.name}, {len(requests)} requests of {args.dataset}; token accuracy of target_new × 100")
    print(
        "| variant | reach | written only | edited | at clamp | ran all steps | remainder first → last | "
        "shares ÷ first |\n|---|---:|---:|---:|---|---:|---|---:|"
    )
    for text in split_variants(args.variants):
        method, overrides = parse_variant(text)
        r = results[text] = measure(lm, requests, method, overrides)
        clamp = ", ".join(f"{site} {k}/{r['n']}" for site, k in r["at_clamp"].items())
        spread = (
            f"{r['remainder_first']:.1f} → {r['remainder_last']:.1f} | {r['written_sum']:.2f}"
            if "written_sum" in r
            else "– | –"
        )
        print(
            f"| {text} | {r['reach']:.1f} | {r['written_only']:.1f} | {r['edited']:.1f} | {clamp} | "
            f"{r['ran_all_steps']}/{r['n']} | {spread} |",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
