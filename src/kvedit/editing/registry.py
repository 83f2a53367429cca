"""The table of editing methods: every editor the CLI, the demo and benchmarks can name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..data.requests import EditRequest
from ..models.lm import LM
from .delta import WeightDelta
from .finetune import FTHyperParams, finetune_edit


@dataclass(frozen=True)
class EditMethod:
    """A named editor: `make_hparams(**overrides)` builds its settings, `run` edits in place."""

    name: str
    summary: str
    make_hparams: Callable[..., Any]
    run: Callable[[LM, Sequence[EditRequest], Any], WeightDelta]


def _finetune(name: str, target: str, summary: str) -> EditMethod:
    def make(preset: str = "default", **overrides: Any) -> FTHyperParams:
        return FTHyperParams.from_preset(preset, target=target, **overrides)

    return EditMethod(name=name, summary=summary, make_hparams=make, run=finetune_edit)


METHODS: Mapping[str, EditMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            _finetune("ft-keys", "keys", "fine-tune the FFN keys (gate and up when gated)"),
            _finetune("ft-key-gate", "key:gate", "fine-tune only the gate keys (gated FFNs)"),
            _finetune("ft-key-up", "key:up", "fine-tune only the up keys (gated FFNs)"),
            _finetune("ft-values", "values", "fine-tune the FFN values (down projection)"),
        )
    }
)


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise ValueError(f"unknown editing method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def edit(
    lm: LM,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "ft-keys",
    hparams: Any | None = None,
    **overrides: Any,
) -> WeightDelta:
    """Edit `requests` into `lm` in place with `method`; return the exact, reversible `WeightDelta`.

    hparams: a ready settings object; otherwise the method's preset (`preset=...`) with `overrides`.
    """
    chosen = get_method(method)
    if isinstance(requests, EditRequest):
        requests = [requests]
    settings = hparams if hparams is not None else chosen.make_hparams(**overrides)
    return chosen.run(lm, list(requests), settings)
