"""Causal tracing (Meng et al. 2022, ROME §2): which hidden states carry a fact from the subject to the answer.

For one prompt, the clean run's top next token `o` has probability `high`. The subject's token embeddings are
then corrupted with Gaussian noise (ν = 3 × the embeddings' standard deviation, `samples` = 10 noisy copies, the
same noise for every restoration), which drops p(o) to `low`. One state at a time is then restored to its clean
value in the noisy runs, at one token t:

- ``residual``: the layer output (the residual stream) at layer l;
- ``ffn`` / ``attn``: the FFN (values module) or attention output at every layer of the window
  [max(0, l − window/2), min(L, l + window/2)) — ten layers round l, cut at the ends.

`scores[kind][t, l]` is p(o) averaged over the noisy copies; the indirect effect is `scores − low`.

Layers below the lowest restored one compute exactly what the noisy run computed, so each restoration starts from
the noisy run's stored states there (`models.split.replayed_layers`), and tokens before the subject (which the
noise cannot reach) keep `low` without a run. All tokens of one (kind, layer) are restored in one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..models.lm import LM
from ..models.split import replayed_layers
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
        return {"prompt": self.prompt, "subject": self.subject, "answer": self.answer, "tokens": self.tokens,
                "subject_range": list(self.subject_range), "high": self.high, "low": self.low,
                "scores": {k: v.tolist() for k, v in self.scores.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "FactTrace":
        return cls(d["prompt"], d["subject"], d["answer"], list(d["tokens"]), tuple(d["subject_range"]),
                   float(d["high"]), float(d["low"]),
                   {k: torch.tensor(v, dtype=torch.float64) for k, v in d["scores"].items()})


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
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        text = "".join(pieces)
        at = text.find(subject)
        ends = torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()
        covering = [i for i, e in enumerate(ends) if e > at and e - len(pieces[i]) < at + len(subject)] if at >= 0 else []
    if not covering:
        raise ValueError(f"no token of the tokenised prompt {prompt!r} covers the subject {subject!r}")
    return list(ids), (covering[0], covering[-1] + 1)


def embedding_noise_scale(lm: LM, subjects: Sequence[str], multiplier: float = NOISE_MULTIPLIER) -> float:
    """ν = `multiplier` × the standard deviation over every element of the token-embedding outputs of each
    subject, tokenised on its own (ROME's `collect_embedding_std`)."""
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        outputs = [embed(torch.tensor([lm.tokenizer(s, add_special_tokens=False)["input_ids"]], device=lm.device))
                   for s in dict.fromkeys(subjects) if s]
    if not outputs:
        raise ValueError("no subjects to measure the embeddings' spread on")
    return multiplier * torch.cat([o.reshape(-1) for o in outputs]).float().std().item()


def _embedding_noise(lm: LM, noise: torch.Tensor, span: tuple[int, int]) -> Callable:
    """A forward hook adding `noise` `[S, n_subject, d]` to rows' subject embeddings (row r gets noise r mod S)."""

    def hook(module, args, output):
        rows = output.shape[0]
        index = torch.arange(rows, device=output.device) % noise.shape[0]
        output = output.clone()
        output[:, span[0]:span[1]] += noise.to(output.device, output.dtype)[index]
        return output

    return hook


class _Tracer:
    """The clean and noisy runs of one prompt, and restorations on top of them."""

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
            self.low = float(self._probabilities(self.ids.expand(samples, -1), 0, None).mean())
        self.noisy = [noisy["residual", l] for l in range(self.n_layers)]  # [S, T, d] each

    def _note_tuple(self, module, args, output) -> None:
        self.as_tuple = isinstance(output, tuple)

    def _probabilities(self, ids: torch.Tensor, start: int, entry: torch.Tensor | None) -> torch.Tensor:
        """p(answer) at the last token of noisy rows `ids`, running layers `start`… on `entry` (start > 0)."""
        replay = replayed_layers(self.lm, start, entry, self.as_tuple) if start else nullcontext()
        embed = self.lm.model.get_input_embeddings()
        handle = None if start else embed.register_forward_hook(_embedding_noise(self.lm, self.noise, self.span))
        try:
            with replay:
                hidden = self.lm.model.base_model(input_ids=ids).last_hidden_state[:, -1]
        finally:
            if handle is not None:
                handle.remove()
        return self.lm.unembed(hidden).float().softmax(-1)[:, self.answer]

    def restore(self, kind: str, layer: int, window: int) -> torch.Tensor:
        """p(answer) `[T]` with `kind` restored at `layer` (or its window), one token at a time."""
        site = KIND_SITES[kind]
        if kind == "residual":
            layers, start = [layer], layer + 1
        else:
            low, high = max(0, layer - window // 2), min(self.n_layers, layer + window - window // 2)
            layers, start = list(range(low, high)), low
        scores = torch.full((self.length,), self.low, dtype=torch.float64)
        tokens = list(range(self.span[0], self.length))  # earlier tokens cannot see the noise: p stays `low`
        per_pass = max(1, ROWS_PER_PASS // self.samples)
        for first in range(0, len(tokens), per_pass):
            chunk = tokens[first:first + per_pass]
            positions = torch.tensor(chunk).repeat_interleave(self.samples)
            rows = len(positions)
            ids = self.ids.expand(rows, -1)
            entry = self.noisy[start - 1].repeat(len(chunk), 1, 1) if start else None
            if kind == "residual":  # the restored state is the next layer's input itself
                assert entry is not None
                entry = Replacement(self.clean[site, layer][positions], positions).apply(entry)
                p = self._probabilities(ids, start, entry)
            else:
                replace = {(site, l): Replacement(self.clean[site, l][positions], positions) for l in layers}
                with Trace(self.lm, replace=replace):
                    p = self._probabilities(ids, start, entry)
            scores[chunk] = p.view(len(chunk), self.samples).mean(1).double().cpu()
        return scores


@torch.no_grad()
def trace_fact(lm: LM, prompt: str, subject: str, nu: float, expected: str | None = None,
               kinds: Sequence[str] = tuple(KIND_SITES), samples: int = SAMPLES, window: int = WINDOW,
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
    answer = lm.tokenizer.decode([tracer.answer])
    if expected is not None and answer.strip() != expected.strip():
        return None
    fact = FactTrace(prompt, subject, answer, [lm.tokenizer.decode([i]) for i in ids], span, tracer.high,
                     tracer.low)
    for kind in kinds:
        fact.scores[kind] = torch.stack([tracer.restore(kind, l, window) for l in range(lm.num_layers)], dim=1)
    return fact
