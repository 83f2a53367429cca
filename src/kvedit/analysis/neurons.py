"""Knowledge neurons (Dai et al. 2022): the memories a fact's answer depends on, by integrated gradients.

For a prompt and its answer's first token y, layer l and memory i, with m̄ the layer's memory coefficients at
the prompt's last token (the values module's input `m = f(h·Kᵀ)`; `act(gate)·up` in gated FFNs):

    Attr(l, i) = m̄_i · (1/steps) · Σ_{k=0}^{steps−1} ∂P(y | m^(l) = (k/steps)·m̄) / ∂m_i

P is the softmax probability (not its log); only layer l's coefficients at the last token are scaled; the
baseline is zero; the grid is the reference code's left sum k/steps (α = 1 is never evaluated).

A prompt's coarse neurons are those with Attr ≥ `threshold` × the largest attribution over all layers (0.2);
a fact's knowledge neurons are those coarse in at least max(`bag_ratio` × prompts, 3) of its prompts (0.7),
the 3 capped at the number of prompts (the reference assumes bags of many prompts; CounterFact has three).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.ffn_width import ffn_width
from ..models.lm import LM, cache_keyword, returned_cache
from ..models.split import appendable_copy, layer_returns_tuple, replayed_layers
from ..models.tracing import Replacement, Scaling, Trace

STEPS = 20  # integration steps (Dai et al.: m = 20)
THRESHOLD = 0.2  # coarse: Attr ≥ 0.2 × max over all layers (reference: threshold_ratio)
BAG_RATIO = 0.7  # refined: coarse in ≥ 0.7 of the fact's prompts (reference: mode_ratio_bag)
MIN_PROMPTS = 3  # … and in at least 3 of them (capped at the number of prompts here)

Neuron = tuple[int, int]  # (layer, memory)


@dataclass
class FactNeurons:
    """One fact's neurons: `neurons` (layer, memory, mean attribution over the prompts) strongest first;
    `coarse` per prompt."""

    prompts: list[str]
    answer: str
    neurons: list[tuple[int, int, float]]
    coarse: list[list[Neuron]]


def _answer_token(lm: LM, answer: str | int) -> int:
    """The first token of ` answer` (with its leading space, as it follows a prompt); a token id passes through."""
    if isinstance(answer, int):
        return answer
    ids = lm.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the answer {answer!r} has no tokens")
    return ids[0]


def attributions(
    lm: LM,
    prompt: str,
    answer: str | int,
    steps: int = STEPS,
    layers: Sequence[int] | None = None,
    on_layer: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Integrated-gradient attributions `[layers, d_ff]` (float32) of P(answer's first token) to every memory
    coefficient at the prompt's last token; rows follow `layers` (default: all); `answer` a string or a token id. `on_layer` is called after each
    layer (progress)."""
    if lm.arch.objective != "causal":
        raise ValueError(f"knowledge neurons are read at the last token of a causal LM; {lm.arch.family} is masked")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    layers = [lm.check_layer(l) for l in (range(lm.num_layers) if layers is None else layers)]
    target = _answer_token(lm, answer)
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
    last = ids.shape[1] - 1
    block_sites = [("residual", l - 1) for l in layers if l > 0]
    with torch.no_grad():  # the tokens before the last one once (their KV cache), then the last one, read
        prefix = returned_cache(lm.model.base_model(input_ids=ids[:, :last], use_cache=True)) if last else None
        with Trace(lm, read=[*(("coefficients", l) for l in layers), *block_sites]) as clean:
            lm.model.base_model(input_ids=ids[:, last:], **_after(lm, prefix, last, 1))
    as_tuple = layer_returns_tuple(lm)
    alphas = torch.arange(steps, dtype=torch.float32, device=lm.device) / steps
    rows = ids[:, last:].expand(steps, -1)  # only the last token runs: the earlier ones cannot see its coefficients
    result = []
    for layer in layers:
        coefficients = clean["coefficients", layer][0, 0]  # [d_ff]
        scaled = (alphas[:, None] * coefficients[None]).detach().requires_grad_(True)
        replace = {("coefficients", layer): Replacement(scaled, torch.zeros(steps, dtype=torch.long, device=lm.device))}
        with torch.enable_grad(), Trace(lm, replace=replace):
            replay = (  # layers below run once: their output enters layer `layer` for every step's row
                replayed_layers(lm, layer, clean["residual", layer - 1].expand(steps, -1, -1), as_tuple)
                if layer > 0
                else nullcontext()
            )
            with replay:
                hidden = lm.model.base_model(input_ids=rows, **_after(lm, prefix, last, steps)).last_hidden_state[:, -1]
            p = lm.unembed(hidden).float().softmax(-1)[:, target]
            (grad,) = torch.autograd.grad(p.sum(), scaled)
        result.append((coefficients.float() * grad.float().sum(0) / steps).detach().cpu())
        if on_layer is not None:
            on_layer()
    return torch.stack(result)


def _after(lm: LM, prefix: Any, last: int, rows: int) -> dict[str, Any]:
    """Forward arguments that run token `last` of `rows` copies of a prompt after `prefix`, the KV cache of its
    tokens 0 … last−1 (a copy: the pass appends to it); none for a one-token prompt."""
    if prefix is None:
        return {}
    cache = appendable_copy(prefix)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return {
        "position_ids": torch.full((rows, 1), last, dtype=torch.long, device=lm.device),
        "attention_mask": torch.ones(rows, last + 1, dtype=torch.long, device=lm.device),
        "use_cache": True,
        **cache_keyword(lm.model.base_model, cache),
    }


def coarse_neurons(scores: torch.Tensor, layers: Sequence[int], threshold: float = THRESHOLD) -> list[Neuron]:
    """(layer, memory) with attribution ≥ `threshold` × the largest over all layers (none if it is ≤ 0)."""
    top = float(scores.max())
    if top <= 0:
        return []
    rows, cols = torch.nonzero(scores >= threshold * top, as_tuple=True)
    return [(layers[r], int(c)) for r, c in zip(rows.tolist(), cols.tolist())]


def fact_neurons(
    lm: LM,
    prompts: Sequence[str],
    answer: str,
    steps: int = STEPS,
    threshold: float = THRESHOLD,
    bag_ratio: float = BAG_RATIO,
    progress: bool = False,
) -> FactNeurons:
    """The knowledge neurons of one fact asked by several `prompts` (see the module's rule); `progress` shows a bar
    over prompts × layers."""
    if not prompts:
        raise ValueError("a fact needs at least one prompt")
    layers = list(range(lm.num_layers))
    total: torch.Tensor | None = None
    coarse: list[list[Neuron]] = []
    bar = tqdm(total=len(prompts) * len(layers), desc="knowledge neurons", unit="layer", disable=not progress)
    for prompt in prompts:
        scores = attributions(lm, prompt, answer, steps, layers, on_layer=lambda: bar.update(1))
        total = scores if total is None else total + scores
        coarse.append(coarse_neurons(scores, layers, threshold))
    bar.close()
    assert total is not None
    needed = max(bag_ratio * len(prompts), min(MIN_PROMPTS, len(prompts)))
    counts = Counter(n for found in coarse for n in set(found))
    kept = [n for n, c in counts.items() if c >= needed - 1e-9]
    mean = total / len(prompts)
    ranked = sorted(((l, i, float(mean[l, i])) for l, i in kept), key=lambda x: -x[2])
    return FactNeurons(list(prompts), answer, ranked, coarse)


@torch.no_grad()
def answer_probability(lm: LM, prompt: str, answer: str, suppressed: Sequence[Neuron] = ()) -> float:
    """P(answer's first token) after `prompt`, with the `suppressed` memories' coefficients set to 0 at the last
    token (Dai et al.'s suppression)."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
    by_layer: dict[int, list[int]] = {}
    for layer, memory in suppressed:
        by_layer.setdefault(layer, []).append(memory)
    last = torch.tensor([ids.shape[1] - 1], device=lm.device)
    scale = {("coefficients", l): Scaling(torch.tensor(m), torch.zeros(len(m)), last) for l, m in by_layer.items()}
    with Trace(lm, scale=scale):
        hidden = lm.model.base_model(input_ids=ids).last_hidden_state[:, -1]
    return float(lm.unembed(hidden).float().softmax(-1)[0, _answer_token(lm, answer)])


def suppression_effect(lm: LM, fact: FactNeurons, seed: int = 0) -> dict[str, float] | None:
    """Relative drop of P(answer), averaged over the fact's prompts, when its knowledge neurons are suppressed,
    and when as many random memories (same layers' count, uniform over all memories) are; None without neurons."""
    if not fact.neurons:
        return None
    rng = random.Random(seed)
    d_ff = ffn_width(lm, 0)
    own = [(l, i) for l, i, _ in fact.neurons]
    taken = set(own)
    others: list[Neuron] = []
    while len(others) < len(own):
        n = (rng.randrange(lm.num_layers), rng.randrange(d_ff))
        if n not in taken:
            taken.add(n)
            others.append(n)
    drops: dict[str, list[float]] = {"knowledge": [], "random": []}
    for prompt in fact.prompts:
        base = answer_probability(lm, prompt, fact.answer)
        for name, chosen in (("knowledge", own), ("random", others)):
            after = answer_probability(lm, prompt, fact.answer, chosen)
            drops[name].append((base - after) / base if base > 0 else math.nan)
    return {name: sum(v) / len(v) for name, v in drops.items()}
