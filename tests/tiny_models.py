"""Tiny random models of every supported family, built from configs, with a word-level tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvedit.models import ARCHITECTURES, LM

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
WORDS = (
    "the eiffel tower colosseum louvre big ben is located in city of paris rome london berlin madrid "
    "capital france italy germany spain language spoken speaks french italian german english a an "
    "and to was born which where it its famous landmark stands lies official country"
).split()


def tiny_tokenizer(masked: bool = False, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a fixed vocabulary; BERT-style `[CLS] … [SEP]` when `masked`,
    `<s> …` when `add_bos` (as Gemma's tokenizer does)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if masked:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    elif add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="<s>",
        eos_token="</s>",
    )
    return tok


def _lower(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    from tokenizers import normalizers

    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


VOCAB = len(SPECIALS) + len(WORDS)
SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=5, eos_token_id=6)
LLAMA_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=4, n_inner=64, n_positions=64, **SMALL),
    "gptj": GPTJConfig(n_embd=32, n_layer=4, n_head=4, n_inner=64, rotary_dim=4, n_positions=64, **SMALL),
    "gpt_neox": GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        **SMALL,
    ),
    "llama": LlamaConfig(**LLAMA_SIZES, **SMALL),
    "mistral": MistralConfig(**LLAMA_SIZES, **SMALL),
    "qwen2": Qwen2Config(**LLAMA_SIZES, **SMALL),
    "qwen3": Qwen3Config(**LLAMA_SIZES, head_dim=8, **SMALL),
    "opt": OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        **SMALL,
    ),
    "bert": BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        **SMALL,
    ),
    "gemma": GemmaConfig(**LLAMA_SIZES, head_dim=8, **SMALL),
    # a soft-cap near the tiny model's logits (|z| ≤ 0.3 at init): scoring must apply it as the forward does
    "gemma2": Gemma2Config(**LLAMA_SIZES, head_dim=8, sliding_window=16, final_logit_softcapping=1.0, **SMALL),
    "gemma3_text": Gemma3TextConfig(**LLAMA_SIZES, head_dim=8, sliding_window=16, **SMALL),
    "olmo": OlmoConfig(**LLAMA_SIZES, **SMALL),
    "olmo2": Olmo2Config(**LLAMA_SIZES, **SMALL),
}
#: families whose real tokenizer adds a BOS token; their tiny models do too
BOS_FAMILIES = ("gemma", "gemma2", "gemma3_text")
assert set(TINY_CONFIGS) == set(ARCHITECTURES), "every architecture row needs a tiny config"


def tiny_lm(model_type: str, seed: int = 0) -> LM:
    """A randomly initialised tiny model of `model_type`, wrapped as an `LM` (float32, eval mode)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]
    masked = ARCHITECTURES[model_type].objective == "masked"
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    arch = ARCHITECTURES[model_type]
    if arch.post_ffn_norm or arch.post_attn_norm:
        _random_post_norms(model, arch)
    tokenizer = _lower(tiny_tokenizer(masked, add_bos=model_type in BOS_FAMILIES))
    return LM.wrap(model, tokenizer, name=f"tiny-{model_type}")


@torch.no_grad()
def _random_post_norms(model, arch) -> None:
    """Give the post-FFN / post-attention norms random gains (they start at exactly 1, which would
    hide a missing gain in the code under test)."""
    for block in model.get_submodule(arch.layers):
        for path in (arch.post_ffn_norm, arch.post_attn_norm):
            if path:
                weight = block.get_submodule(path).weight
                weight.copy_(torch.rand_like(weight) * 1.5 + 0.25 - arch.norm_weight_offset)
