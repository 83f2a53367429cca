"""What the explorer's prompt, memory and intervention views compute, as JSON-ready data.

The prompt view is `kvedit.analysis.inspect.inspect_prompt`'s analysis (the same memories, coefficients,
value tokens and logit lens, a test holds them equal) with the vocabulary projections of all layers done
in one matrix product each instead of one per layer, and the token strings computed once per model:
that is what makes a prompt answer in well under a second on the bundled model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..analysis.inspect import Intervention, check_distribution, intervention_scales
from ..analysis.triggers import TriggerSet
from ..analysis.values import ValueProjection
from ..analysis.vocab import logit_lens, project
from ..data.requests import RequestError, check_text
from ..models.lm import LM
from ..models.memory import ffn_memory
from ..models.tracing import Trace


class Vocabulary:
    """Every token id's string (as `analysis.vocab.token_strings`) and a look-up from string to id."""

    def __init__(self, strings: list[str]) -> None:
        self.strings = strings
        self._ids: dict[str, int] = {}
        for i, s in enumerate(strings):
            self._ids.setdefault(s, i)

    def __getitem__(self, token_id: int) -> str:
        return self.strings[token_id]

    def token_id(self, lm: LM, text: str) -> int:
        """The id of the one vocabulary token `text`: its word-initial form `" " + text` when the vocabulary has
        one (what a word after a space is in BPE vocabularies), else `text` itself.

        Raises ValueError naming the pieces the tokenizer splits `text` into when it is no single token.
        """
        if not text or not text.strip():
            raise ValueError("the token is empty; type one token of the vocabulary, e.g. ' Paris'")
        for candidate in (text,) if text[0].isspace() else (" " + text, text):
            if candidate in self._ids:
                return self._ids[candidate]
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or lm.tokenizer.unk_token_id in ids:
            raise ValueError(f"{text!r} is not a token of this model's vocabulary (its tokenizer does not know it)")
        pieces = [self.strings[i] for i in ids]
        raise ValueError(
            f"{text!r} is not one token of this model's vocabulary: the tokenizer splits it into "
            f"{pieces}; give a single token such as {pieces[0]!r}"
        )

    def follow(self, lm: LM, text: str | None) -> tuple[int | None, str | None]:
        """The token to follow for `text` and a note for the page: `text`'s own token (no note); the first
        token of a text the tokenizer splits (a note saying so); or None (a note saying the column is off)."""
        if not text or not text.strip():
            return None, None
        check_text(text, "the followed token", max_chars=200)
        try:
            return self.token_id(lm, text), None
        except ValueError as err:
            ids = lm.tokenizer((" " + text) if not text[0].isspace() else text, add_special_tokens=False)["input_ids"]
            if not ids or lm.tokenizer.unk_token_id in ids:
                return None, f"the follow column is off: {err}"
            pieces = [self.strings[i] for i in ids]
            return ids[0], (
                f"{text!r} is {len(ids)} tokens of this model ({' + '.join(map(repr, pieces))}); "
                f"following its first token {pieces[0]!r}"
            )


def context_length(lm: LM) -> int | None:
    """The most positions the model reads (its config's max_position_embeddings), if it says."""
    n = getattr(lm.model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_prompt(lm: LM, text: str, what: str, max_chars: int, max_tokens: int | None = None) -> int:
    """Check a text before it reaches the model: valid Unicode, at most `max_chars` characters, and at most
    `max_tokens` tokens and the model's context; returns its number of tokens. Raises RequestError naming `what`."""
    check_text(text, f"the {what}", max_chars=max_chars)
    n = len(lm.tokenizer(text)["input_ids"])
    limits = [
        (m, why)
        for m, why in ((max_tokens, "the explorer's limit"), (context_length(lm), f"{lm.name}'s context"))
        if m is not None
    ]
    for limit, why in sorted(limits, key=lambda x: x[0])[:1]:
        if n > limit:
            raise RequestError(f"the {what} is {n} tokens long; at most {limit} are accepted ({why})")
    return n


def encode(lm: LM, text: str, what: str = "prompt") -> dict[str, torch.Tensor]:
    """Tokenise one text `[1, T]`; refuse an empty text and text the tokenizer can only read as unknown."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {what} is empty; type some text")
    check_text(text, f"the {what}")
    check_known(lm, text, what)
    return lm.tokenizer(text, return_tensors="pt").to(lm.device)


def check_known(lm: LM, text: str, what: str) -> None:
    """Raise ValueError when the tokenizer maps part of `text` to its unknown token."""
    tok = lm.tokenizer
    unk = tok.unk_token_id
    if unk is None or (tok.unk_token and tok.unk_token in text):
        return
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if unk in ids:
        words = [w for w in text.split() if unk in tok(w, add_special_tokens=False)["input_ids"]]
        raise ValueError(
            f"the {what} {text!r} holds text this model's tokenizer does not know "
            f"({', '.join(map(repr, words)) or 'some of it'} becomes {tok.unk_token}); rephrase it"
        )


def _top(probs: torch.Tensor, vocab: Vocabulary, k: int) -> list[dict[str, Any]]:
    top = probs.topk(min(k, probs.shape[-1]))
    return [{"token": vocab[t], "id": t, "prob": float(p)} for t, p in zip(top.indices.tolist(), top.values.tolist())]


def _watch(probs: torch.Tensor, token_id: int, vocab: Vocabulary) -> dict[str, Any]:
    """Probability and rank (1 = most likely) of one token under `probs` `[vocab]`."""
    p = probs[token_id]
    return {"token": vocab[token_id], "id": token_id, "prob": float(p), "rank": int((probs > p).sum()) + 1}


@torch.no_grad()
def prompt_view(
    lm: LM,
    vocab: Vocabulary,
    prompt: str,
    top_memories: int = 10,
    top_tokens: int = 5,
    next_tokens: int = 10,
    watch: str | None = None,
    cached: Callable[[int], ValueProjection | None] | None = None,
) -> dict[str, Any]:
    """One prompt at its last token: the next-token distribution, and per layer the `top_memories` memories
    with the largest `|m_i|·‖v_i‖` (coefficient, contribution, the value's top tokens read with the sign of
    `m_i`, no final norm) and the logit lens (top tokens, probabilities). `watch`: one vocabulary token whose
    probability and rank are also given per layer and at the output. `cached(layer)`: that layer's value
    projection with at least `top_tokens` tokens per memory, if already computed (`ValueTokenCache.get`)."""
    enc = encode(lm, prompt)
    watch_id, watch_note = vocab.follow(lm, watch)
    layers = list(range(lm.num_layers))
    with Trace(lm, read=[(kind, l) for l in layers for kind in ("coefficients", "residual")]) as tr:
        logits = lm.model(**enc).logits[0, -1].float()
    picks, signed, tokens = [], [], {}
    for layer in layers:
        m = tr["coefficients", layer][0, -1].float()
        values = ffn_memory(lm, layer).written.detach().float()
        contribution = m.abs() * values.norm(dim=1)
        best = contribution.topk(min(top_memories, m.shape[0])).indices
        picks.append((m[best].tolist(), contribution[best].tolist(), best.tolist()))
        known = cached(layer) if cached is not None else None
        for key, coef in zip(best.tolist(), m[best].tolist()):
            if known is not None and coef != 0:  # the top tokens of +v, or of −v for a negative coefficient
                tokens[layer, key] = (known.top_ids if coef > 0 else known.bottom_ids)[key, :top_tokens].tolist()
            else:
                signed.append(((layer, key), values[key] * (1.0 if coef > 0 else -1.0 if coef < 0 else 0.0)))
    if signed:
        fresh = project(lm, torch.stack([v for _, v in signed])).topk(top_tokens, dim=-1).indices.tolist()
        tokens |= {site: ids for (site, _), ids in zip(signed, fresh)}
    lens = torch.softmax(logit_lens(lm, torch.stack([tr["residual", l][0, -1] for l in layers])), -1)
    out_layers = []
    for layer, (coefs, contribs, keys) in zip(layers, picks):
        memories = []
        for key, coef, contrib in zip(keys, coefs, contribs):
            memories.append(
                {
                    "key": key,
                    "coefficient": coef,
                    "contribution": contrib,
                    "value_tokens": [vocab[t] for t in tokens[layer, key]],
                }
            )
        entry = {"layer": layer, "memories": memories, "lens": _top(lens[layer], vocab, top_tokens)}
        if watch_id is not None:
            entry["watch"] = _watch(lens[layer], watch_id, vocab)
        out_layers.append(entry)
    probs = torch.softmax(logits, -1)
    ids = enc["input_ids"][0].tolist()
    result: dict[str, Any] = {
        "prompt": prompt,
        "tokens": [vocab[t] for t in ids],
        "final_norm": False,
        "layers": out_layers,
        "next_token": _top(probs, vocab, next_tokens),
    }
    if watch_id is not None:
        result["watch"] = _watch(probs, watch_id, vocab)
    if watch_note:
        result["watch_note"] = watch_note
    return result


@torch.no_grad()
def memory_view(
    lm: LM,
    vocab: Vocabulary,
    layer: int,
    key: int,
    prompt: str | None = None,
    triggers: TriggerSet | None = None,
    top_tokens: int = 10,
    examples: int = 10,
) -> dict[str, Any]:
    """Memory `key` of `layer`: the top tokens its value promotes (`+v`) and those it promotes when its
    coefficient is negative (`-v`); its trigger examples when `triggers` holds the layer; on `prompt`, its
    coefficient at every token and its rank by `|m|·‖v‖` among the layer's memories at the last token."""
    layer = lm.check_layer(layer)
    mem = ffn_memory(lm, layer)
    if not isinstance(key, int) or not 0 <= key < mem.d_ff:
        raise ValueError(f"memory {key!r} is out of range; layer {layer} has memories 0..{mem.d_ff - 1}")
    written = mem.written.detach().float()
    v = written[key]
    scores = project(lm, torch.stack([v, -v]))  # [2, vocab]
    top = scores.topk(top_tokens, dim=-1)
    tokens = [
        [{"token": vocab[t], "logit": float(s)} for t, s in zip(i.tolist(), x.tolist())]
        for i, x in zip(top.indices, top.values)
    ]
    result: dict[str, Any] = {
        "layer": layer,
        "key": key,
        "d_ff": mem.d_ff,
        "value_norm": float(v.norm()),
        "key_norm": float(mem.key[key].detach().float().norm()),
        "promotes": tokens[0],
        "promotes_if_negative": tokens[1],
    }
    if prompt is not None:
        enc = encode(lm, prompt)
        with Trace(lm, read=[("coefficients", layer)], stop=True) as tr:
            lm.model(**enc)
        m = tr["coefficients", layer][0].float()  # [T, d_ff]
        contribution = m[-1].abs() * written.norm(dim=1)
        result["on_prompt"] = {
            "prompt": prompt,
            "tokens": [vocab[t] for t in enc["input_ids"][0].tolist()],
            "coefficients": m[:, key].tolist(),
            "contribution": float(contribution[key]),
            "rank": int((contribution > contribution[key]).sum()) + 1,
        }
    if triggers is not None and layer in triggers.layers:
        result["triggers"] = [_example(lm, vocab, ex) for ex in triggers.examples(layer, key, examples)]
        result["triggers_source"] = {k: triggers.meta.get(k) for k in ("source", "tokens", "rank")}
    return result


def _example(lm: LM, vocab: Vocabulary, ex) -> dict[str, Any]:
    return {
        "coefficient": ex.coefficient,
        "context": lm.tokenizer.decode(list(ex.ids[:-1]), skip_special_tokens=True),
        "trigger": vocab[ex.ids[-1]],
        "next": vocab[ex.next_id] if ex.next_id is not None else None,
    }


@torch.no_grad()
def intervene(
    lm: LM,
    vocab: Vocabulary,
    prompt: str,
    interventions: Sequence[Intervention],
    k: int = 10,
    watch: str | None = None,
) -> dict[str, Any]:
    """The next-token distribution of `prompt` before and after scaling memories (0 switches one off):
    the top `k` of each, KL(before‖after) in nats, whether the top token changed, and the `k` tokens
    whose probability moved most."""
    if not interventions:
        raise ValueError("no memories chosen; add at least one LAYER:MEMORY to zero or scale")
    enc = encode(lm, prompt)
    watch_id, watch_note = vocab.follow(lm, watch)
    scales = intervention_scales(lm, list(interventions))
    before = torch.softmax(lm.model(**enc).logits[0, -1].float(), -1)
    with Trace(lm, scale=scales):
        after = check_distribution(torch.softmax(lm.model(**enc).logits[0, -1].float(), -1), list(interventions))
    moved = (after - before).abs().topk(k).indices.tolist()
    result: dict[str, Any] = {
        "prompt": prompt,
        "interventions": [
            {"layer": lm.check_layer(iv.layer), "key": iv.key, "factor": iv.factor} for iv in interventions
        ],
        "before": _top(before, vocab, k),
        "after": _top(after, vocab, k),
        "kl_before_after": float((before * (before.clamp_min(1e-12).log() - after.clamp_min(1e-12).log())).sum()),
        "top_changed": int(before.argmax()) != int(after.argmax()),
        "largest_changes": [{"token": vocab[t], "before": float(before[t]), "after": float(after[t])} for t in moved],
    }
    if watch_id is not None:
        result["watch"] = {"before": _watch(before, watch_id, vocab), "after": _watch(after, watch_id, vocab)}
    if watch_note:
        result["watch_note"] = watch_note
    return result


@torch.no_grad()
def next_token(lm: LM, vocab: Vocabulary, prompt: str, k: int = 5) -> list[dict[str, Any]]:
    """The top `k` next tokens of `prompt` with their probabilities."""
    enc = encode(lm, prompt)
    return _top(torch.softmax(lm.model(**enc).logits[0, -1].float(), -1), vocab, k)
