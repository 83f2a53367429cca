"""Causal tracing (Meng et al. 2022, ROME §2): which hidden states carry a fact from the subject to the answer.

For one prompt, the clean run's top next token `o` has probability `high`. The subject's token embeddings are
then corrupted with Gaussian noise (ν = 3 × the embeddings' standard deviation, `samples` = 10 noisy copies, the
same noise for every restoration), which drops p(o) to `low`. One state at a time is then restored to its clean
value in the noisy runs, at one token t:

- ``residual``: the layer output (the residual stream) at layer l;
- ``ffn`` / ``attn``: the FFN (values module) or attention output at every layer of the window
  [max(0, l − window/2), min(L, l + window/2)) — ten layers round l, cut at the ends.

`scores[kind][t, l]` is p(o) averaged over the noisy copies; the indirect effect is `scores − low`.

Only what a restoration can change is recomputed. Layers below the lowest restored one compute what the noisy run
computed, so each restoration starts from the noisy run's stored states there (`models.split.replayed_layers`);
the model is causal, so a restoration at token t changes only tokens t…, and tokens before t are read from the
noisy run's KV cache (computed once per t and shared by every (kind, layer)); tokens before the subject (which the
noise cannot reach) keep `low` without a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..models.lm import LM
from ..models.lm import cache_keyword, returned_cache
from ..models.split import appendable_copy, replayed_layers
from ..models.tracing import Replacement, Trace

#: restored state -> the Trace site it is read from and written back to
KIND_SITES = {"residual": "residual", "ffn": "ffn_out", "attn": "attn_out"}
SAMPLES = 10  # noisy copies per prompt (ROME: causal_trace.py, samples=10)
NOISE_MULTIPLIER = 3.0  # ν = 3σ (ROME's default noise level "s3")
WINDOW = 10  # layers restored at once for ffn/attn (ROME: window=10, [l − 5, l + 5))
NOISE_SEED = 1  # ROME re-seeds its noise with RandomState(1): every restoration sees the same noise
ROWS_PER_PASS = 256  # noisy rows per forward pass at most


@dataclass
class FactTrace:
    """One traced fact. scores: kind -> `[T, L]` restored p(answer); high/low: clean and corrupted p(answer)."""

    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]  # [start, end) token indices of the subject
    high: float
    low: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "tokens": self.tokens,
            "subject_range": list(self.subject_range),
            "high": self.high,
            "low": self.low,
            "scores": {k: v.tolist() for k, v in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FactTrace":
        return cls(
            d["prompt"],
            d["subject"],
            d["answer"],
            list(d["tokens"]),
            tuple(d["subject_range"]),
            float(d["high"]),
            float(d["low"]),
            {k: torch.tensor(v, dtype=torch.float64) for k, v in d["scores"].items()},
        )


def subject_token_range(lm: LM, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """The prompt's token ids and [start, end) of the tokens that cover the first occurrence of `subject` in it
    (by the tokenizer's character offsets; by decoded token text, as ROME's `find_token_range`, for tokenizers
    without offsets). Raises ValueError if the subject is not in the prompt."""
    at = prompt.find(subject)
    if at < 0 or not subject:
        raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r}")
    if lm.tokenizer.is_fast:
        encoded = lm.tokenizer(prompt, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        covering = [i for i, (s, e) in enumerate(offsets) if e > s and e > at and s < at + len(subject)]
    else:
        ids = lm.tokenizer(prompt)["input_ids"]
        pieces = [str(lm.tokenizer.decode([i])) for i in ids]
        text = "".join(pieces)
        at = text.find(subject)
        ends = torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()
        covering = (
            [i for i, e in enumerate(ends) if e > at and e - len(pieces[i]) < at + len(subject)] if at >= 0 else []
        )
    if not covering:
        raise ValueError(f"no token of the tokenised prompt {prompt!r} covers the subject {subject!r}")
    return list(ids), (covering[0], covering[-1] + 1)


def embedding_noise_scale(lm: LM, subjects: Sequence[str], multiplier: float = NOISE_MULTIPLIER) -> float:
    """ν = `multiplier` × the standard deviation over every element of the token-embedding outputs of each
    subject, tokenised on its own (ROME's `collect_embedding_std`)."""
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        outputs = [
            embed(torch.tensor([lm.tokenizer(s, add_special_tokens=False)["input_ids"]], device=lm.device))
            for s in dict.fromkeys(subjects)
            if s
        ]
    if not outputs:
        raise ValueError("no subjects to measure the embeddings' spread on")
    return multiplier * torch.cat([o.reshape(-1) for o in outputs]).float().std().item()


def _embedding_noise(noise: torch.Tensor, columns: tuple[int, int], repeats: int) -> Callable:
    """A forward hook adding `noise` `[S, n, d]` to the token-embedding output's columns [a, b) (b − a = n) of
    `S × repeats` rows (row r gets noise r // repeats)."""

    def hook(module, args, output):
        output = output.clone()
        output[:, columns[0] : columns[1]] += noise.to(output.device, output.dtype).repeat_interleave(repeats, 0)
        return output

    return hook


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> list[int]:
    """The layers whose `kind` state is restored for the score at `layer`: `layer` itself for the residual stream,
    the window [max(0, layer − window/2), min(L, layer + window/2)) for ffn / attn."""
    if kind == "residual":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2)))


def _start_layer(kind: str, layer: int, window: int, n_layers: int) -> int:
    """The lowest layer a restoration changes the input of (L when it restores the last layer's output)."""
    return layer + 1 if kind == "residual" else restored_layers(kind, layer, window, n_layers)[0]


class _Tracer:
    """The clean and noisy runs of one prompt, and restorations on top of them.

    A restoration at token t changes only tokens t… (the model is causal), and only layers from its start layer up
    (`_start_layer`): it runs the tokens t… of the noisy rows through those layers, reading the tokens before t
    from the noisy run's KV cache (`prefix(t)`) and starting from the noisy run's stored input of the start layer.
    Restorations with the same token and start layer run as one batch of `samples × restorations` rows.
    """

    def __init__(self, lm: LM, ids: list[int], span: tuple[int, int], nu: float, samples: int) -> None:
        self.lm, self.ids, self.span, self.samples = lm, torch.tensor([ids], device=lm.device), span, samples
        self.n_layers, self.length = lm.num_layers, len(ids)
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.noise = nu * torch.randn(samples, span[1] - span[0], lm.d_model, generator=generator)
        sites = [(site, l) for site in KIND_SITES.values() for l in range(self.n_layers)]
        self.as_tuple = False
        block = lm.module(f"{lm.arch.layers}.0")
        handle = block.register_forward_hook(self._note_tuple)
        try:
            with Trace(lm, read=sites) as clean:
                logits = lm.unembed(lm.model.base_model(input_ids=self.ids).last_hidden_state[:, -1])
        finally:
            handle.remove()
        self.clean = {site: clean[site][0] for site in sites}  # [T, d] each
        probs = logits.float().softmax(-1)[0]
        self.answer = int(probs.argmax())
        self.high = float(probs[self.answer])
        residual = [("residual", l) for l in range(self.n_layers)]
        with Trace(lm, read=residual) as noisy:
            self.low = float(self._probabilities(0, 0, None, None, 1).mean())
        self.noisy = [noisy["residual", l] for l in range(self.n_layers)]  # [S, T, d] each

    def _note_tuple(self, module, args, output) -> None:
        self.as_tuple = isinstance(output, tuple)

    def _noise_hook(self, first: int, end: int, repeats: int):
        """The embedding hook noising the subject tokens among tokens [first, end) of `S × repeats` rows, or None
        if there are none."""
        low, high = max(first, self.span[0]), min(end, self.span[1])
        if low >= high:
            return None
        noise = self.noise[:, low - self.span[0] : high - self.span[0]]
        hook = _embedding_noise(noise, (low - first, high - first), repeats)
        return self.lm.model.get_input_embeddings().register_forward_hook(hook)

    def prefix(self, token: int):
        """The noisy rows' KV cache of tokens 0 … token−1 (None for token 0)."""
        if token == 0:
            return None
        handle = self._noise_hook(0, token, 1)
        try:
            out = self.lm.model.base_model(input_ids=self.ids[:, :token].expand(self.samples, -1), use_cache=True)
        finally:
            if handle is not None:
                handle.remove()
        return returned_cache(out)

    def _probabilities(self, token: int, start: int, entry: torch.Tensor | None, cache, repeats: int) -> torch.Tensor:
        """p(answer) `[S × repeats]` at the last token of the noisy rows (row r has noise r // repeats), running
        tokens `token`… (`cache` holding the earlier ones) through layers `start`… on `entry` `[S × repeats,
        T − token, d]` (start > 0)."""
        rows = self.samples * repeats
        replay = replayed_layers(self.lm, start, entry, self.as_tuple) if entry is not None else nullcontext()
        handle = None if start else self._noise_hook(token, self.length, repeats)
        extra = {}
        if cache is not None:
            cache = appendable_copy(cache)  # the pass appends to it
            if repeats > 1:
                cache.batch_repeat_interleave(repeats)
            positions = torch.arange(token, self.length, device=self.lm.device).expand(rows, -1)
            mask = torch.ones(rows, self.length, dtype=torch.long, device=self.lm.device)
            extra = {
                "position_ids": positions,
                "attention_mask": mask,
                "use_cache": True,
                **cache_keyword(self.lm.model.base_model, cache),
            }
        try:
            with replay:
                hidden = self.lm.model.base_model(
                    input_ids=self.ids[:, token:].expand(rows, -1), **extra
                ).last_hidden_state[:, -1]
        finally:
            if handle is not None:
                handle.remove()
        return self.lm.unembed(hidden).float().softmax(-1)[:, self.answer]

    def restore(
        self, token: int, start: int, restorations: Sequence[tuple[str, int]], window: int, cache
    ) -> list[float]:
        """p(answer) averaged over the noisy rows for each (kind, layer) restoration at `token`, all starting at
        layer `start`; `cache`: `prefix(token)`."""
        k, samples = len(restorations), self.samples
        rows = torch.arange(samples * k).view(samples, k)  # row s·k + j: sample s, restoration j
        entry = self.noisy[start - 1][:, token:].repeat_interleave(k, 0) if start else None
        groups: dict[tuple[str, int], list[int]] = {}  # site -> restorations writing it
        for j, (kind, layer) in enumerate(restorations):
            if _start_layer(kind, layer, window, self.n_layers) != start:
                raise ValueError(f"restoration {kind} at layer {layer} does not start at layer {start}")
            if kind == "residual":  # the restored state is the next layer's input itself
                assert entry is not None
                value = self.clean["residual", layer][token].expand(samples, -1)
                entry = Replacement(value, torch.zeros(samples, dtype=torch.long), rows[:, j]).apply(entry)
            else:
                for l in restored_layers(kind, layer, window, self.n_layers):
                    groups.setdefault((KIND_SITES[kind], l), []).append(j)
        replace = {}
        for site, js in groups.items():
            chosen = rows[:, js].reshape(-1)  # the restored token is the first one run: position 0
            replace[site] = Replacement(
                self.clean[site][token].expand(len(chosen), -1), torch.zeros(len(chosen), dtype=torch.long), chosen
            )
        with Trace(self.lm, replace=replace):
            p = self._probabilities(token, start, entry, cache, k)
        return p.view(samples, k).double().mean(0).tolist()


@torch.no_grad()
def trace_fact(
    lm: LM,
    prompt: str,
    subject: str,
    nu: float,
    expected: str | None = None,
    kinds: Sequence[str] = tuple(KIND_SITES),
    samples: int = SAMPLES,
    window: int = WINDOW,
) -> FactTrace | None:
    """Trace one fact. `expected`: the known answer; when given and the clean top token, decoded and stripped,
    is not it, the fact is skipped (None), as ROME skips facts the model does not predict."""
    if lm.arch.objective != "causal":
        raise ValueError(f"causal tracing needs a causal language model; {lm.arch.family} is a masked LM")
    unknown = [k for k in kinds if k not in KIND_SITES]
    if unknown or not kinds:
        raise ValueError(f"kinds must be among {', '.join(KIND_SITES)}; got {list(kinds)}")
    if samples < 1 or window < 1:
        raise ValueError(f"samples and window must be >= 1, got {samples} and {window}")
    ids, span = subject_token_range(lm, prompt, subject)
    tracer = _Tracer(lm, ids, span, nu, samples)
    answer = str(lm.tokenizer.decode([tracer.answer]))
    if expected is not None and answer.strip() != expected.strip():
        return None
    fact = FactTrace(
        prompt, subject, answer, [str(lm.tokenizer.decode([i])) for i in ids], span, tracer.high, tracer.low
    )
    for kind in kinds:  # tokens before the subject cannot see the noise: their p stays `low`
        fact.scores[kind] = torch.full((len(ids), lm.num_layers), tracer.low, dtype=torch.float64)
    batch = max(1, ROWS_PER_PASS // samples)
    by_start: dict[int, list[tuple[str, int]]] = {}
    for kind in kinds:
        for layer in range(lm.num_layers):
            by_start.setdefault(_start_layer(kind, layer, window, lm.num_layers), []).append((kind, layer))
    for token in range(span[0], len(ids)):
        cache = tracer.prefix(token)
        for start, restorations in by_start.items():
            for first in range(0, len(restorations), batch):
                chunk = restorations[first : first + batch]
                for (kind, layer), p in zip(chunk, tracer.restore(token, start, chunk, window, cache)):
                    fact.scores[kind][token, layer] = p
    return fact
