"""Training settings for adapter tuning, and the named presets.

- `qiu2024`: the seed repo's settings (REFERENCE §7): LoRA r 8, alpha 16, dropout 0.1; AdamW lr 2e-4, constant
  after 3 % warm-up, max grad norm 0.3; 5 epochs; 4 × 16 sequences per step; packing to 512 tokens, loss over
  prompt and label.
- `default`: sized for a CPU: the same adapter and optimiser, lr 1e-3, 1 epoch, 8 sequences per step padded by
  length (≤ 256 tokens), loss on the label (and EOS) only, so a few hundred steps teach the task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from ..editing.presets import given_overrides

#: what an IA3 adapter on each role means (shown by `kvedit tune --help`)
IA3_CAVEAT = (
    "IA3 rescales activations: on values it scales down_proj's input, which equals rescaling each value vector "
    "(memory cell) and leaves which cells fire unchanged; only gate-side scaling changes key selectivity."
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a tuning run's result (recorded with every adapter and result).

    batch_size: sequences per forward pass; grad_accum: forward passes per optimiser step.
    max_length: tokens per sequence (packed chunks, or examples cut from the left to keep the label).
    loss_on: "all" (prompt + label, the seed) or "label" (label tokens and EOS).
    max_steps: optimiser steps; None = `epochs` passes over the data.
    checkpoint_every: optimiser steps between resumable checkpoints.
    """

    adapter: Literal["lora", "ia3"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    packing: bool = False
    loss_on: Literal["all", "label"] = "label"
    checkpoint_every: int = 25
    seed: int = 0
    preset: str = "default"

    def __post_init__(self) -> None:
        positive = {
            "rank": self.rank,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
            "checkpoint_every": self.checkpoint_every,
        }
        bad = [f"{k}={v}" for k, v in positive.items() if not isinstance(v, int) or v < 1]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"max_steps={self.max_steps}")
        if self.epochs <= 0 or self.lr <= 0:
            bad.append(f"epochs={self.epochs}, lr={self.lr}")
        if self.loss_on not in ("all", "label"):
            bad.append(f"loss_on={self.loss_on!r} (expected 'all' or 'label')")
        if self.adapter not in ("lora", "ia3"):
            bad.append(f"adapter={self.adapter!r} (expected 'lora' or 'ia3')")
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(bad)}; counts must be positive integers")

    def replace(self, **changes: Any) -> "TrainConfig":
        """These settings with `changes` (None: keep the value, as for the editors' overrides)."""
        return dataclasses.replace(self, **given_overrides(changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: Mapping[str, TrainConfig] = MappingProxyType(
    {
        "default": TrainConfig(),
        "qiu2024": TrainConfig(
            lr=2e-4,
            epochs=5.0,
            batch_size=4,
            grad_accum=16,
            max_length=512,
            packing=True,
            loss_on="all",
            preset="qiu2024",
        ),
    }
)


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The named preset with `overrides` (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
