"""What every editor's settings share: the `EditorSettings` protocol, range checks, and the closed-form
editors' common base.

An editor's settings are a frozen dataclass with `validate(lm) -> settings`: with a model it checks layers
and modules too and returns the settings the edit will use (defaults filled in); without one (`None`) it
checks only what needs no model, so a command can refuse bad input before loading anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..models.lm import LM
from .targets import TargetOptions

if TYPE_CHECKING:
    from typing_extensions import Self

#: settings that must be > 0 (>= 1 for counts), and settings that must be >= 0, whichever editor has them
POSITIVE_SETTINGS = ("lr", "max_steps", "stats_tokens", "mom2_update_weight", "clamp_norm_factor", "stop_nll")
NON_NEGATIVE_SETTINGS = ("weight_decay", "kl_factor")


class EditorSettings(Protocol):
    """Any editor's settings, as the registry, the commands and the editors pass them around: a frozen
    dataclass (its fields are the patch's metadata["hparams"]) naming the preset it came from.

    validate(lm): check them (with a model: layers and modules too) and return the settings an edit uses;
    `registry.make_settings` calls it, and `registry.edit` trusts what that returned.
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def preset(self) -> str: ...

    def validate(self, lm: LM | None) -> Self: ...


def check_ranges(settings: EditorSettings) -> None:
    """Raise ValueError naming the first setting outside its range (NaN and ±Inf are outside every range)."""
    for name in POSITIVE_SETTINGS + NON_NEGATIVE_SETTINGS:
        value = getattr(settings, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    for name in POSITIVE_SETTINGS:
        value = getattr(settings, name, None)
        if value is not None and not value > 0:
            bound = ">= 1" if isinstance(value, int) else "> 0"
            raise ValueError(f"{name} must be {bound}, got {value}")
    for name in NON_NEGATIVE_SETTINGS:
        value = getattr(settings, name, None)
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class ClosedFormHyperParams:
    """Settings shared by ROME, MEMIT and PMET: the target optimisation and the key statistics.

    max_steps: Adam steps of the target optimisation (v*, z, δ); lr its learning rate; kl_factor the weight
    of the KL term on "{subject} is a"; weight_decay the ‖δ‖/‖init‖² penalty; clamp_norm_factor bounds
    ‖δ‖ ≤ factor·‖init‖; stop_nll (None in the reference editors) ends the optimisation once the target's
    mean NLL is below it. stats_source / stats_tokens: the corpus of the key statistics E[kkᵀ].
    """

    max_steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_nll: float | None = None
    stats_source: str = "self"
    stats_tokens: int = 100_000
    preset: str = "gpt2-xl"

    def edit_layers(self) -> tuple[int, ...]:
        """The layers whose weights the edit changes (as given; may be negative)."""
        raise NotImplementedError

    def validate(self, lm: LM | None):
        """Check ranges, and with a model the edit layers; return self."""
        check_ranges(self)
        if lm is not None:
            layers = self.edit_layers()
            if not layers:
                raise ValueError("no edit layer is set; give layers=… or use a preset that sets them")
            for layer in layers:
                lm.check_layer(layer)
        return self

    def target_options(self, **extra: Any) -> TargetOptions:
        return TargetOptions(
            steps=self.max_steps,
            lr=self.lr,
            kl_factor=self.kl_factor,
            weight_decay=self.weight_decay,
            clamp_norm_factor=self.clamp_norm_factor,
            stop_nll=self.stop_nll,
            **extra,
        )


@dataclass
class EditOutcome:
    """What an editor returns after changing the weights in place.

    steps: optimisation steps taken (summed over requests); records: the editor's typed diagnostics
    (kept in memory on the delta, never saved); result: further fields for the patch's metadata["result"].
    """

    steps: int
    records: Any = None
    result: dict[str, Any] = field(default_factory=dict)
