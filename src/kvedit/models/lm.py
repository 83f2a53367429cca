"""`LM`: a model, its tokenizer and its architecture row, with module look-ups by role."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from .architectures import Architecture, architecture_for


@dataclass
class LM:
    """A loaded language model that kvedit can inspect and edit.

    Build one with `kvedit.load_model(...)` or `LM.wrap(model, tokenizer)`.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    name: str = ""
    base_fingerprint: str = ""  # fingerprint when wrapped: keys caches that outlive edits (statistics)
    #: results computed once per loaded model and reused within the process (key statistics, their
    #: inverses), keyed as their disk cache is; they depend on the unedited weights only
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    #: precision of the editors' inner loops ("float32" or "bfloat16"; `models.compute`): set it with
    #: `set_compute_dtype`, which checks the device has bfloat16 matrix units
    compute_dtype: str = "float32"

    @classmethod
    def wrap(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "") -> "LM":
        """Wrap an already loaded model (eval mode; a pad token is set if missing)."""
        arch = architecture_for(model.config)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        model.eval()
        lm = cls(model=model, tokenizer=tokenizer, arch=arch, name=name or str(model.config.name_or_path))
        lm.base_fingerprint = lm.fingerprint()
        return lm

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameters (the input embedding under a device map)."""
        return next(self.model.parameters()).device

    @property
    def output_device(self) -> torch.device:
        """Where logits come out: the unembedding's device (differs from `device` when the model is split)."""
        return self.model.get_output_embeddings().weight.device

    def generate(self, **options: Any) -> torch.Tensor:
        """`model.generate(**options)`: token ids `[batch, prompt + new tokens]`."""
        if not isinstance(self.model, GenerationMixin):
            raise TypeError(f"{type(self.model).__name__} cannot generate text (no GenerationMixin)")
        ids = self.model.generate(**options)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"generate returned {type(ids).__name__}; kvedit asks for token ids only")
        return ids

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[..., vocab]` of final hidden states `[..., d_model]`, as the model's forward makes them: the
        output layer, then `c·tanh(x/c)` when the config sets a final-logit soft-cap `c` (Gemma-2 style)."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def num_layers(self) -> int:
        return len(self.layer_list())

    def layer_list(self) -> nn.ModuleList:
        """The decoder's layers, in order."""
        layers = self.module(self.arch.layers)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{self.arch.layers} is {type(layers).__name__}, not a ModuleList")
        return layers

    @property
    def d_model(self) -> int:
        return int(tensor_attr(self.model.get_input_embeddings(), "weight").shape[1])

    # ---- module look-ups ---------------------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def layer_path(self, layer: int, rel: str) -> str:
        """Full dotted name of module `rel` in layer `layer` (negative layers count from the end)."""
        return f"{self.arch.layers}.{self.check_layer(layer)}.{rel}"

    def check_layer(self, layer: int) -> int:
        n = self.num_layers
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer {layer!r} is out of range; this model has layers 0..{n - 1}")
        return layer % n

    def layer_module(self, layer: int, rel: str) -> nn.Module:
        return self.module(self.layer_path(layer, rel))

    def key_paths(self, layer: int, roles: tuple[str, ...] | None = None) -> dict[str, str]:
        """Full names of the key modules of `layer` by role ("key", or "gate"/"up")."""
        roles = tuple(self.arch.keys) if roles is None else roles
        unknown = [r for r in roles if r not in self.arch.keys]
        if unknown:
            raise ValueError(f"{self.arch.family} has no key module {unknown}; its keys are {sorted(self.arch.keys)}")
        return {role: self.layer_path(layer, self.arch.keys[role]) for role in roles}

    def values_path(self, layer: int) -> str:
        return self.layer_path(layer, self.arch.values)

    def attn_out_path(self, layer: int) -> str:
        return self.layer_path(layer, self.arch.attn_out)

    # ---- identity ----------------------------------------------------------------------------
    def _in_memory(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, or for a weight a device map offloaded (a meta tensor) the copy accelerate keeps for it."""
        if tensor.device.type != "meta":
            return tensor
        owner, _, local = name.rpartition(".")
        weights = getattr(getattr(self.model.get_submodule(owner), "_hf_hook", None), "weights_map", None)
        if weights is None:
            raise ValueError(f"{name} is on the meta device and no offloaded copy of it was found")
        return weights[local]

    def fingerprint(self, samples_per_tensor: int = 1024) -> str:
        """A short hash of the architecture and a strided sample of every weight.

        Cheap (well under a second for 135M parameters) and changes when any edited matrix changes.
        """
        h = hashlib.blake2b(digest_size=12)
        cfg = self.model.config
        essentials = {
            k: getattr(cfg, k, None)
            for k in ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer")
        }
        h.update(json.dumps(essentials, sort_keys=True).encode())
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                flat = self._in_memory(name, p).detach().reshape(-1)
                step = max(1, flat.numel() // samples_per_tensor)
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
        return h.hexdigest()


def cache_keyword(module: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for `module(...)`: transformers 5.2x renamed a forward's KV-cache argument
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); earlier releases take only the old one."""
    parameters = inspect.signature(module.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a forward with `use_cache=True` returned, read from the field this transformers declares (see
    `cache_keyword`): asking a new output for the old name logs a deprecation warning."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """`module.<name>` as a tensor (a parameter, a buffer, or a tensor set in its place), typed as one."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, not a tensor")
    return value
