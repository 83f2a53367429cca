"""Generation metrics of CounterFact: fluency and consistency (memit `eval_utils_counterfact`).

- Generation: for each generation prompt, top-k sampling (k = 5) until prompt plus continuation
  reach 100 tokens; the text keeps the prompt, is NFKD-normalised and "\\n\\n" becomes " ".
  As in the reference sampler, end-of-text is a token like any other: it can be sampled, sampling
  goes on after it, and decoding drops it. Sampling is seeded (the seed is recorded with the results).
- Fluency: per text, base-2 entropies of the word-bigram and word-trigram frequency
  distributions weighted 2/3 and 4/3, and their mean; averaged over a case's texts (reported
  × 100 by the summaries: unedited GPT-J ≈ 622). Words are NLTK Treebank tokens. The reference
  splits sentences with NLTK's punkt model first; its data cannot be fetched offline, so
  sentences are split after ., ! or ? followed by a space (the same on ordinary prose).
- Consistency: cosine of the TF-IDF vectors of the case's joined generations and of the
  joined Wikipedia snippets about target_new's attribute (needs the official
  attribute_snippets, idf and vocabulary files; without them it is absent, never 0).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.requests import EditRequest
from ..models.lm import LM, cache_keyword, returned_cache

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern, lower-cased


def words(text: str) -> list[str]:
    """NLTK Treebank word tokens of `text`, sentence by sentence."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [w for sentence in _SENTENCE_END.split(text) if sentence for w in tokenizer.tokenize(sentence)]


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean of the weighted base-2 entropies of the word n-gram frequency distributions of `text`."""
    tokens = words(text)
    values = []
    for n, weight in zip(ns, weights):
        counts = np.array(list(Counter(zip(*(tokens[i:] for i in range(n)))).values()), dtype=float)
        if counts.size == 0:
            values.append(0.0)
            continue
        p = counts / counts.sum()
        values.append(weight * float(-(p * np.log2(p)).sum()))
    return float(np.mean(values))


def clean_generation(text: str) -> str:
    """The reference's post-processing of a generated text."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def generate_ids(
    lm: LM, prompts: Sequence[str], total_tokens: int = 100, top_k: int = 5, seed: int = 0
) -> list[list[int]]:
    """Token ids of one top-k sample per prompt: the prompt's ids, then sampled ones up to
    `total_tokens` in all.

    Each step samples from the `top_k` most probable next tokens, renormalised (the reference's
    `generate_fast`). Nothing is blocked and nothing stops a row early: an end-of-text token may be
    sampled and the row continues after it. A private generator seeded with `seed` draws the
    samples, so the global torch RNG is untouched.
    """
    if not prompts:
        return []
    tok = lm.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(lm.device)
    lengths = enc["attention_mask"].sum(1).tolist()
    new_tokens = total_tokens - min(lengths)
    width = enc["input_ids"].shape[1]
    ids, mask = enc["input_ids"], enc["attention_mask"]
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    step_ids = ids
    for _ in range(max(0, new_tokens)):
        out = lm.model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            **cache_keyword(lm.model, cache),
            use_cache=True,
        )
        cache = returned_cache(out)
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        top_probs, top_ids = probs.topk(top_k, dim=-1)
        step_ids = top_ids.gather(-1, torch.multinomial(top_probs, 1, generator=generator))
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        positions = positions[:, -1:] + 1
    # each row: its own prompt, then its continuation, cut at total_tokens
    return [row[width - n : width - n + total_tokens].tolist() for row, n in zip(ids, lengths)]


def generate_texts(lm: LM, prompts: Sequence[str], total_tokens: int = 100, top_k: int = 5, seed: int = 0) -> list[str]:
    """`generate_ids` decoded (prompt included) and cleaned as the reference does."""
    return [
        clean_generation(str(lm.tokenizer.decode(ids, skip_special_tokens=True)))
        for ids in generate_ids(lm, prompts, total_tokens, top_k, seed)
    ]


def tfidf_vector(text: str, vocab: Mapping[str, int], idf: np.ndarray) -> np.ndarray:
    """L2-normalised TF-IDF vector (raw counts × idf), as scikit-learn's TfidfVectorizer defaults."""
    vector = np.zeros(len(idf))
    for token, count in Counter(_TFIDF_TOKEN.findall(text.lower())).items():
        if token in vocab:
            vector[vocab[token]] = count * idf[vocab[token]]
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def tfidf_similarity(a: str, b: str, vocab: Mapping[str, int], idf: np.ndarray) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts."""
    return float(tfidf_vector(a, vocab, idf) @ tfidf_vector(b, vocab, idf))


@dataclass(frozen=True)
class AttributeSnippets:
    """The reference's consistency resources: snippet texts per `"relation_id/target_id"`, and the
    TF-IDF vocabulary and idf weights."""

    texts: Mapping[str, Sequence[str]]
    vocab: Mapping[str, int]
    idf: np.ndarray


def load_attribute_snippets(folder: Path | None = None) -> AttributeSnippets:
    """The official attribute_snippets.json, idf.npy and tfidf_vocab.json, from `folder` or the cache
    (downloaded on first use). Snippets are keyed `"relation_id/target_id"`."""
    from ..data.download import CONSISTENCY_FILES, official_file

    paths = {name: (folder / name if folder else official_file(name, url)) for name, url in CONSISTENCY_FILES.items()}
    texts: dict[str, list[str]] = {}
    for entry in json.loads(paths["attribute_snippets.json"].read_text()):
        key = f"{entry['relation_id']}/{entry['target_id']}"
        texts.setdefault(key, []).extend(sample["text"] for sample in entry["samples"])
    vocab = json.loads(paths["tfidf_vocab.json"].read_text())
    return AttributeSnippets(texts, vocab, np.load(paths["idf.npy"]))


def generation_case_metrics(
    lm: LM,
    requests: Sequence[EditRequest],
    seed: int = 0,
    snippets: AttributeSnippets | None = None,
) -> list[dict[str, Any]]:
    """Per request: {"fluency", "consistency"} where it can be computed, {} where the request has no
    generation prompts (the metric is then absent, not 0)."""
    out: list[dict[str, Any]] = []
    for request in requests:
        if not request.generation_prompts:
            out.append({})
            continue
        texts = generate_texts(lm, request.generation_prompts, seed=seed)
        case: dict[str, Any] = {"fluency": sum(map(ngram_entropy, texts)) / len(texts), "generation_seed": seed}
        refs = snippets.texts.get(request.attribute or "") if snippets is not None else None
        if refs and snippets is not None:
            case["consistency"] = tfidf_similarity(" ".join(texts), " ".join(refs), snippets.vocab, snippets.idf)
        out.append(case)
    return out
