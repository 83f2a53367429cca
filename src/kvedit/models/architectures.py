"""Every architecture fact kvedit relies on, as one table of data.

Module paths are relative: `layers` from the model root, per-layer paths from layer `i`.
To support a new family, add one `Architecture` row to `ARCHITECTURES` (keyed by the
config's `model_type`) and a tiny config for it in `tests/tiny_models.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from transformers import PretrainedConfig


class UnsupportedModelError(ValueError):
    """The model's family has no row in the architecture table."""


@dataclass(frozen=True)
class Architecture:
    """Where the FFN key-value memories and their neighbours live in one model family.

    keys: key modules by role, e.g. ``{"key": "mlp.c_fc"}`` or
        ``{"gate": "mlp.gate_proj", "up": "mlp.up_proj"}`` (gated FFN).
    values: the values (second FFN) module; its input is the memory coefficient vector.
    attn_out: the attention output projection.
    transposed: weights are stored `[in, out]` (GPT-2's `Conv1D`) instead of `[out, in]`.
    activation_attr: config attribute naming the FFN activation.
    parallel: attention and FFN read the same layer input (GPT-J); a config attribute
        name in `parallel_attr` overrides it per checkpoint (GPT-NeoX).
    objective: "causal" (next-token LM) or "masked" (BERT-style MLM head).
    attn_qv: the attention modules that compute queries and values (the usual LoRA default),
        per layer; one fused module when the family computes q, k and v in one projection.
    attn_qv_note: what "q/v" means for this family when it is not two separate modules.
    attn: the attention module; its input is the (normalised) hidden state attention reads.
    post_norm: each sub-layer's output is added to the residual and then normalised (post-LN,
        BERT), so the residual stream before a sub-layer cannot be recovered by subtraction.
    post_ffn_norm: a norm the FFN's output (the values module's output) passes through before it is
        added to the residual (Gemma-2/3 `post_feedforward_layernorm`, OLMo-2). What the memories write
        into the residual is then `post_ffn_norm(Σ m_i v_i)`, not `Σ m_i v_i`.
    post_attn_norm: the same for the attention output projection (Gemma-2/3, OLMo-2).
    norm_weight_offset: those RMSNorms scale by `offset + weight` (1 for Gemma, which stores `gain − 1`).
    ffn_width_attr: config attribute holding the FFN width (the number of memories per layer); GPT-2 and GPT-J
        leave it None to mean 4 × d_model.
    """

    family: str
    layers: str
    keys: Mapping[str, str]
    values: str
    attn_out: str
    final_norm: str
    unembed: str
    embed: str
    activation_attr: str
    transposed: bool = False
    parallel: bool = False
    parallel_attr: str | None = None
    objective: Literal["causal", "masked"] = "causal"
    attn_qv: tuple[str, ...] = ()
    attn_qv_note: str = ""
    attn: str | None = None
    post_norm: bool = False
    post_ffn_norm: str | None = None
    post_attn_norm: str | None = None
    norm_weight_offset: float = 0.0
    ffn_width_attr: str = "intermediate_size"

    @property
    def gated(self) -> bool:
        return "gate" in self.keys

    def is_parallel(self, config: PretrainedConfig) -> bool:
        if self.parallel_attr is not None:
            return bool(getattr(config, self.parallel_attr, self.parallel))
        return self.parallel

    def activation(self, config: PretrainedConfig) -> str:
        return str(getattr(config, self.activation_attr))


_LLAMA_LIKE = Architecture(  # the shared row of Llama-style families; each row below replaces its family
    family="Llama-like",
    layers="model.layers",
    keys={"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
    values="mlp.down_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    activation_attr="hidden_act",
    attn_qv=("self_attn.q_proj", "self_attn.v_proj"),
    attn="self_attn",
)

_ROWS: dict[str, Architecture] = {
    "gpt2": Architecture(
        family="GPT-2",
        ffn_width_attr="n_inner",
        layers="transformer.h",
        keys={"key": "mlp.c_fc"},
        values="mlp.c_proj",
        attn_out="attn.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        activation_attr="activation_function",
        transposed=True,
        attn_qv=("attn.c_attn",),
        attn_qv_note="GPT-2 computes q, k and v in one Conv1D (attn.c_attn): attn-qv adapts that fused "
        "projection, so its keys k are adapted too",
        attn="attn",
    ),
    "gptj": Architecture(
        family="GPT-J",
        ffn_width_attr="n_inner",
        layers="transformer.h",
        keys={"key": "mlp.fc_in"},
        values="mlp.fc_out",
        attn_out="attn.out_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        activation_attr="activation_function",
        parallel=True,
        attn_qv=("attn.q_proj", "attn.v_proj"),
        attn="attn",
    ),
    "gpt_neox": Architecture(
        family="GPT-NeoX / Pythia",
        layers="gpt_neox.layers",
        keys={"key": "mlp.dense_h_to_4h"},
        values="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        embed="gpt_neox.embed_in",
        activation_attr="hidden_act",
        parallel=True,
        parallel_attr="use_parallel_residual",
        attn_qv=("attention.query_key_value",),
        attn_qv_note="GPT-NeoX computes q, k and v in one Linear (attention.query_key_value): attn-qv adapts "
        "that fused projection, so its keys k are adapted too",
        attn="attention",
    ),
    "llama": replace(_LLAMA_LIKE, family="Llama / SmolLM2"),
    "mistral": replace(_LLAMA_LIKE, family="Mistral"),
    "qwen2": replace(_LLAMA_LIKE, family="Qwen2"),
    "qwen3": replace(_LLAMA_LIKE, family="Qwen3"),
    "gemma": replace(_LLAMA_LIKE, family="Gemma", norm_weight_offset=1.0),
    "gemma2": replace(
        _LLAMA_LIKE,
        family="Gemma-2",
        activation_attr="hidden_activation",
        post_ffn_norm="post_feedforward_layernorm",
        post_attn_norm="post_attention_layernorm",
        norm_weight_offset=1.0,
    ),
    "gemma3_text": replace(
        _LLAMA_LIKE,
        family="Gemma-3 (text)",
        activation_attr="hidden_activation",
        post_ffn_norm="post_feedforward_layernorm",
        post_attn_norm="post_attention_layernorm",
        norm_weight_offset=1.0,
    ),
    "olmo": replace(_LLAMA_LIKE, family="OLMo"),
    "olmo2": replace(
        _LLAMA_LIKE,
        family="OLMo-2",
        post_ffn_norm="post_feedforward_layernorm",
        post_attn_norm="post_attention_layernorm",
    ),
    "opt": Architecture(
        family="OPT",
        ffn_width_attr="ffn_dim",
        layers="model.decoder.layers",
        keys={"key": "fc1"},
        values="fc2",
        attn_out="self_attn.out_proj",
        final_norm="model.decoder.final_layer_norm",
        unembed="lm_head",
        embed="model.decoder.embed_tokens",
        activation_attr="activation_function",
        attn_qv=("self_attn.q_proj", "self_attn.v_proj"),
        attn="self_attn",
    ),
    "bert": Architecture(
        family="BERT (masked LM)",
        layers="bert.encoder.layer",
        keys={"key": "intermediate.dense"},
        values="output.dense",
        attn_out="attention.output.dense",
        final_norm="cls.predictions.transform",
        unembed="cls.predictions.decoder",
        embed="bert.embeddings.word_embeddings",
        activation_attr="hidden_act",
        objective="masked",
        attn_qv=("attention.self.query", "attention.self.value"),
        attn="attention",
        post_norm=True,
    ),
}

#: The table, read-only: no row can change at run time, and no two rows share a mutable dict.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {name: replace(row, keys=MappingProxyType(dict(row.keys))) for name, row in _ROWS.items()}
)


def supported_families() -> list[str]:
    """`model_type (family)` strings, for messages and `kvedit models`."""
    return [f"{key} ({arch.family})" for key, arch in ARCHITECTURES.items()]


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The table row for a model config; raise `UnsupportedModelError` if there is none."""
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported. Supported: {', '.join(supported_families())}. "
        "To add a family, add an Architecture row (module paths of keys, values, attention output, "
        "final norm, unembedding) to ARCHITECTURES in kvedit/models/architectures.py."
    )
