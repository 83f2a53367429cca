"""Adapter targets by FFN role, read from the architecture table, and the peft adapters built on them.

Roles (combine with `+`, e.g. ``attn-qv+key-up``):

- ``attn-qv``: the attention query and value projections (peft's usual default); GPT-2 and GPT-NeoX compute
  q, k and v in one fused module, so there the role adapts that whole module (the table's `attn_qv_note`).
- ``key-gate``, ``key-up``: one key matrix of a gated FFN; ``key``: the key matrix of a non-gated FFN.
- ``keys``: every key module of the FFN (gate and up, or the single key).
- ``values``: the FFN's values (down projection).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from ..models.lm import LM, tensor_attr

if TYPE_CHECKING:
    from peft import PeftModel

AdapterType = Literal["lora", "ia3"]


def role_modules(lm: LM) -> dict[str, tuple[str, ...]]:
    """Every role this model has → its per-layer module paths (relative to a layer), from the table."""
    arch = lm.arch
    roles: dict[str, tuple[str, ...]] = {}
    if arch.attn_qv:
        roles["attn-qv"] = arch.attn_qv
    for role, path in arch.keys.items():
        roles["key" if role == "key" else f"key-{role}"] = (path,)
    roles["keys"] = tuple(arch.keys.values())
    roles["values"] = (arch.values,)
    return roles


def _is_ffn_input(lm: LM, rel: str) -> bool:
    return rel == lm.arch.values


@dataclass(frozen=True)
class TargetSet:
    """A named set of roles on chosen layers: `modules` are the full module names peft will adapt."""

    name: str
    roles: tuple[str, ...]
    layers: tuple[int, ...]
    relative: tuple[str, ...]  # per-layer module paths, in table order
    modules: tuple[str, ...]  # full dotted names, layer-major
    notes: tuple[str, ...] = field(default=())

    @property
    def layers_pattern(self) -> str:
        """The last component of the layer list's path (`layers`, `h`, `layer`): peft's `layers_pattern`."""
        return self.layers_path.rsplit(".", 1)[-1]

    layers_path: str = ""


def parse_targets(lm: LM, spec: str, layers: Sequence[int] | None = None) -> TargetSet:
    """Resolve `spec` (roles joined by `+`) on `layers` (default: all); clear errors name the valid ones."""
    available = role_modules(lm)
    roles = tuple(r.strip() for r in spec.split("+"))
    if not spec.strip() or any(not r for r in roles):
        raise ValueError(f"target set {spec!r} is empty; expected roles joined by '+', from {sorted(available)}")
    unknown = [r for r in roles if r not in available]
    if unknown:
        raise ValueError(
            f"target {spec!r}: {lm.arch.family} has no role {unknown}; valid roles: {', '.join(available)} "
            "(combine with '+', e.g. attn-qv+values)"
        )
    if len(set(roles)) != len(roles):
        raise ValueError(f"target {spec!r} names a role twice")
    n = lm.num_layers
    chosen = tuple(range(n)) if layers is None else tuple(layers)
    bad = [l for l in chosen if not isinstance(l, int) or not -n <= l < n]
    if bad or not chosen:
        raise ValueError(
            f"layers {list(bad) or list(chosen)} out of range: this model has layers 0..{n - 1} "
            "(negative numbers count from the last)"
        )
    chosen = tuple(dict.fromkeys(l % n for l in chosen))
    relative: list[str] = []
    for role in roles:
        relative += [p for p in available[role] if p not in relative]
    order = [p for paths in available.values() for p in paths]
    relative.sort(key=order.index)
    notes = (lm.arch.attn_qv_note,) if "attn-qv" in roles and lm.arch.attn_qv_note else ()
    modules = tuple(lm.layer_path(l, rel) for l in sorted(chosen) for rel in relative)
    return TargetSet(spec, roles, tuple(sorted(chosen)), tuple(relative), modules, notes, lm.arch.layers)


def adapter_config(
    lm: LM, targets: TargetSet, adapter: AdapterType = "lora", rank: int = 8, alpha: float = 16, dropout: float = 0.1
):
    """The peft config adapting exactly `targets.modules` (full names, so no suffix can match a neighbour)."""
    from peft import IA3Config, LoraConfig, TaskType

    common: dict[str, Any] = dict(
        target_modules=list(targets.modules),
        layers_to_transform=list(targets.layers),
        layers_pattern=targets.layers_pattern,
        task_type=TaskType.CAUSAL_LM,
    )
    if adapter == "lora":
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        # peft annotates lora_alpha as int; a float works (its scale is alpha / r), and `kvedit tune --alpha` takes one
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]
            lora_dropout=dropout,
            bias="none",
            fan_in_fan_out=lm.arch.transposed,
            **common,
        )
    if adapter == "ia3":  # IA3Config has no layers_to_transform: the full module names already pick the layers
        ffn_inputs = [m for m in targets.modules if m.endswith("." + lm.arch.values)]
        return IA3Config(
            target_modules=list(targets.modules),
            feedforward_modules=ffn_inputs,
            fan_in_fan_out=lm.arch.transposed,
            task_type=TaskType.CAUSAL_LM,
        )
    raise ValueError(f"adapter must be 'lora' or 'ia3', got {adapter!r}")


def attach_adapter(
    lm: LM,
    targets: TargetSet,
    adapter: AdapterType = "lora",
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.1,
    seed: int = 0,
) -> PeftModel:
    """Wrap `lm.model` in a peft model adapting `targets` (adapter weights initialised from `seed`).

    The wrapped model shares the base weights; `lm.model` is left as it was (call
    `detach_adapter` to unload). Returns the peft model.
    """
    from peft import get_peft_model

    if lm.arch.objective != "causal":
        raise ValueError(f"tuning needs a causal language model; {lm.arch.family} is a masked LM")
    devices = [lm.device] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), quiet_peft():  # seeded init; the caller's RNG state is left alone
        torch.manual_seed(seed)
        return get_peft_model(lm.model, adapter_config(lm, targets, adapter, rank, alpha, dropout))


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide the FutureWarning transformers raises when peft reads the deprecated `is_gradient_checkpointing`
    while wrapping a model (peft's doing, nothing a kvedit user can act on); every other warning shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def detach_adapter(peft_model: PeftModel) -> PreTrainedModel:
    """Remove the adapter layers and return the base model with its original weights."""
    base = peft_model.unload()
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"unloading the adapter gave {type(base).__name__}, not a transformers model")
    return base


def adapted_modules(peft_model: nn.Module) -> list[str]:
    """Full names (base-model paths) of the modules that carry an adapter, in model order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def lora_parameter_count(lm: LM, targets: TargetSet, rank: int) -> int:
    """Hand count: r × (in + out) for every targeted matrix."""
    total = 0
    for name in targets.modules:
        w = tensor_attr(lm.module(name), "weight")
        total += rank * (int(w.shape[0]) + int(w.shape[1]))
    return total


def describe(targets: TargetSet, trainable: int, total: int) -> str:
    """One line for the user before training: which modules, on which layers, how many parameters."""
    layers = targets.layers
    span = f"{layers[0]}..{layers[-1]}" if list(layers) == list(range(layers[0], layers[-1] + 1)) else str(list(layers))
    text = (
        f"{targets.name}: {', '.join(targets.relative)} on layers {span} ({len(targets.modules)} modules); "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f} %)"
    )
    return "\n".join([text, *(f"  note: {n}" for n in targets.notes)])
