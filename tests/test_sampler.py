"""The fluency sampler samples as the reference's `generate_fast` does: top-k from the renormalised
probabilities, end-of-text allowed (and sampling going on after it), seeded."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

from kvedit.evaluation.generation import generate_ids, generate_texts

PROMPTS = ["the eiffel tower is", "rome is the capital of italy and"]


def boost(lm, token: int, amount: float):
    """Add `amount` to one token's logit everywhere (a forward hook on the unembedding)."""

    def hook(module, args, output):
        bump = torch.zeros(output.shape[-1], dtype=output.dtype)
        bump[token] = amount
        return output + bump

    return lm.model.get_output_embeddings().register_forward_hook(hook)


def brute_force_sample(lm, prompts, total_tokens: int, top_k: int, seed: int) -> list[list[int]]:
    """The reference loop without a KV cache: the whole left-padded batch is run again for every token."""
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(1).tolist()
    width = ids.shape[1]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(total_tokens - min(lengths)):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            probs, top = torch.softmax(logits.float(), -1).topk(top_k, -1)
            token = top.gather(-1, torch.multinomial(probs, 1, generator=generator))
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return [row[width - n : width - n + total_tokens].tolist() for row, n in zip(ids, lengths)]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_cached_sampling_equals_the_plain_reference_loop(family):
    lm = tiny(family)
    assert generate_ids(lm, PROMPTS, total_tokens=16, top_k=5, seed=7) == brute_force_sample(lm, PROMPTS, 16, 5, 7)


def test_end_of_text_can_be_sampled_and_sampling_goes_on_after_it():
    lm = tiny("llama")
    eos = lm.tokenizer.eos_token_id
    handle = boost(lm, eos, 4.0)  # end-of-text becomes likely, not certain
    try:
        rows = generate_ids(lm, PROMPTS, total_tokens=30, seed=0)
        texts = generate_texts(lm, PROMPTS, total_tokens=30, seed=0)
    finally:
        handle.remove()
    for prompt, row, text in zip(PROMPTS, rows, texts):
        n_prompt = len(lm.tokenizer(prompt)["input_ids"])
        continuation = row[n_prompt:]
        assert len(row) == 30  # no early stop
        assert eos in continuation  # min_new_tokens used to set its logit to −∞
        first = continuation.index(eos)
        assert any(t != eos for t in continuation[first + 1 :])  # tokens other than end-of-text follow it
        assert "</s>" not in text  # decoding drops it, as the reference does


def test_sampling_leaves_the_global_rng_alone():
    lm = tiny("llama")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_ids(lm, PROMPTS, total_tokens=12, seed=5)
    assert torch.equal(torch.rand(3), expected)
