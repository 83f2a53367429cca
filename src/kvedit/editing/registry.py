"""The table of editing methods: every editor the CLI, the demo and benchmarks can name."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any

from ..data.requests import EditRequest
from ..models.lm import LM
from ..version import __version__
from .delta import EditError, WeightDelta, WeightGuard
from .finetune import FT_PRESETS, FTHyperParams, finetune_edit, finetune_parameters, model_settings
from .alphaedit import ALPHAEDIT_PRESETS, AlphaEditHyperParams, alphaedit_edit, alphaedit_parameters, alphaedit_prepare
from .hparams import EditOutcome
from .kn import KN_PRESETS, KNHyperParams, kn_edit, kn_parameters
from .tpatcher import TPATCHER_PRESETS, TPatcherHyperParams, tpatcher_edit, tpatcher_parameters, tpatcher_prepare
from .memit import MEMIT_PRESETS, MEMITHyperParams, memit_edit, memit_parameters, memit_prepare
from .pmet import PMET_PRESETS, PMETHyperParams, pmet_edit, pmet_parameters, pmet_prepare
from .presets import make_hparams, model_row
from .rome import ROME_PRESETS, ROMEHyperParams, rome_edit, rome_parameters, rome_prepare


@dataclass(frozen=True)
class EditMethod:
    """A named editor. The registry's `edit` does what every editor needs (checks, timing, the weight
    guard, the patch metadata); an editor only computes its update:

    make_hparams(lm, **overrides): its settings from a preset; `parameters(lm, hp)`: the names of the
    weights it may change; `run(lm, requests, hp)`: change them in place and return an `EditOutcome`;
    `prepare(lm, hp)`: compute or load once what every edit with those settings reuses (key statistics,
    context templates), so that an edit's time is its own.

    Overrides every method accepts: preset, layers, lr, max_steps (`presets`: the names a preset may take).
    carries_history: `run` also takes `history=` (state a sequential run carries from batch to batch, e.g.
    AlphaEdit's Σ K Kᵀ) and returns the next one in its outcome's records (`records.history`).
    """

    name: str
    summary: str
    make_hparams: Callable[..., Any]
    parameters: Callable[[LM, Any], list[str]]
    run: Callable[[LM, Sequence[EditRequest], Any], EditOutcome]
    prepare: Callable[[LM, Any], None] | None = None
    presets: tuple[str, ...] = ()
    carries_history: bool = False
    uses_statistics: bool = False  # reads key statistics (stats_source / stats_tokens settings, `prepare`)


def _finetune(name: str, target: str, summary: str) -> EditMethod:
    def make(lm: LM | None, preset: str | None = None, **overrides: Any) -> FTHyperParams:
        chosen = model_settings(lm, target) if preset is None else {}  # a named preset keeps its own settings
        merged = {**overrides, **{k: v for k, v in chosen.items() if overrides.get(k) is None}}
        return FTHyperParams.from_preset(preset or "default", target=target, **merged)

    return EditMethod(name, summary, make, finetune_parameters, finetune_edit, presets=tuple(FT_PRESETS))


def _kn() -> EditMethod:
    def make(lm: LM | None, preset: str | None = None, **overrides: Any) -> KNHyperParams:
        return make_hparams(KNHyperParams, KN_PRESETS, preset, lm, **{k: v for k, v in overrides.items()
                                                                      if v is not None})

    return EditMethod("kn", "knowledge neurons of the true object: their value rows moved towards the new "
                      "object's embedding (EasyEdit's KN)", make, kn_parameters, kn_edit, presets=tuple(KN_PRESETS))


def _closed_form(name: str, cls: type, presets: Mapping[str, Any], parameters: Callable, run: Callable,
                 prepare: Callable, summary: str, **fixed: Any) -> EditMethod:
    def make(lm: LM | None, preset: str | None = None, **overrides: Any) -> Any:
        given = {k: v for k, v in overrides.items() if v is not None}  # a setting the caller gives wins
        return make_hparams(cls, presets, preset, lm, **{**fixed, **given})

    return EditMethod(name, summary, make, parameters, run, prepare, presets=tuple(presets), uses_statistics=True)


_ROME = (ROMEHyperParams, ROME_PRESETS, rome_parameters, rome_edit, rome_prepare)
_MEMIT = (MEMITHyperParams, MEMIT_PRESETS, memit_parameters, memit_edit, memit_prepare)
_PMET = (PMETHyperParams, PMET_PRESETS, pmet_parameters, pmet_edit, pmet_prepare)
_ALPHAEDIT = (AlphaEditHyperParams, ALPHAEDIT_PRESETS, alphaedit_parameters, alphaedit_edit, alphaedit_prepare)

#: The `-fast` variants (not the reference algorithm): the preset's learning rate × FAST_LR_FACTOR, and each request
#: stops once target_new's mean NLL is below FAST_STOP_NLL nats. Chosen from traces of the optimisation on
#: CounterFact cases outside the README's tables; the paired comparison with the reference rule is in the README.
FAST_LR_FACTOR = 2.0
FAST_STOP_NLL = 0.1


def _fast(base: EditMethod) -> EditMethod:
    def make(lm: LM | None, preset: str | None = None, **overrides: Any) -> Any:
        hp = base.make_hparams(lm, preset, **overrides)
        given = {k for k, v in overrides.items() if v is not None}
        return replace(hp, lr=hp.lr if "lr" in given else hp.lr * FAST_LR_FACTOR,
                       stop_nll=hp.stop_nll if "stop_nll" in given else FAST_STOP_NLL)

    summary = f"{base.name.upper()} with a faster target optimisation (lr ×{FAST_LR_FACTOR:g}, stop at NLL < {FAST_STOP_NLL})"
    return replace(base, name=f"{base.name}-fast", summary=summary, make_hparams=make)


_ROME_METHOD = _closed_form("rome", *_ROME, "rank-one update of one layer's values")
_MEMIT_METHOD = _closed_form("memit", *_MEMIT, "batch update spread over layers")

METHODS: Mapping[str, EditMethod] = MappingProxyType(
    {
        m.name: m
        for m in (
            _finetune("ft-keys", "keys", "fine-tune the FFN keys (gate and up when gated)"),
            _finetune("ft-key-gate", "key:gate", "fine-tune only the gate keys (gated FFNs)"),
            _finetune("ft-key-up", "key:up", "fine-tune only the up keys (gated FFNs)"),
            _finetune("ft-values", "values", "fine-tune the FFN values (down projection)"),
            _ROME_METHOD,
            _MEMIT_METHOD,
            _closed_form("pmet", *_PMET,
                         "attention+FFN targets, FFN-only update, √ spread"),
            _closed_form("pmet-no-attn-delta", *_PMET,
                         "PMET ablation: optimise the FFN delta alone", attn_delta=False),
            _closed_form("pmet-update-attn", *_PMET,
                         "PMET ablation: also update the attention output weights", update_attn=True),
            _closed_form("pmet-even-spread", *_PMET,
                         "PMET ablation: MEMIT's even spread", spread="even"),
            replace(_closed_form("alphaedit", *_ALPHAEDIT, "MEMIT's targets, update projected onto the null "
                                 "space of preserved keys"), carries_history=True),
            _fast(_ROME_METHOD),
            _fast(_MEMIT_METHOD),
            _kn(),
            _closed_form("t-patcher", TPatcherHyperParams, TPATCHER_PRESETS, tpatcher_parameters, tpatcher_edit,
                         tpatcher_prepare, "adds memories (a key and a value each) to the last FFN layer, one per "
                         "mistaken target token (T-Patcher)"),
        )
    }
)


def get_method(name: str) -> EditMethod:
    if name not in METHODS:
        raise ValueError(f"unknown editing method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def chosen_for_model(lm: LM, method: str) -> bool:
    """Whether `method`'s default settings for `lm` were chosen for this very model (a MODEL_PRESETS row, or
    FT_MODEL_SETTINGS for fine-tuning; benchmarks/select_presets.py), not inherited from its family."""
    base = get_method(method)
    if base.name.startswith("ft-"):
        target = base.make_hparams(None).target
        return bool(model_settings(lm, target))
    return model_row(lm) in base.presets


def make_settings(lm: LM | None, method: str, **overrides: Any) -> Any:
    """The settings `edit(lm, …, method, **overrides)` would use, checked.

    With `lm` None only what needs no model is checked (method, preset, setting names and ranges), so a
    command can refuse bad input before loading anything; with a model, layers and modules too.
    Overrides that are None mean "the preset's value".
    """
    settings = get_method(method).make_hparams(lm, **{k: v for k, v in overrides.items() if v is not None})
    return settings.validate(lm)


def _layers_touched(lm: LM, names: Sequence[str]) -> list[int]:
    """Layer numbers of the parameters an edit changed (from their dotted names)."""
    prefix = lm.arch.layers + "."
    return sorted({int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)})


def edit(
    lm: LM,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "ft-keys",
    hparams: Any | None = None,
    history: Any | None = None,
    **overrides: Any,
) -> WeightDelta:
    """Edit `requests` into `lm` in place with `method`; return the exact, reversible `WeightDelta`.

    hparams: a ready settings object; otherwise the method's preset (`preset=...`, default: the
    one for the model's family) with `overrides`. On any failure (Ctrl-C, NaN/Inf weights included)
    the weights are restored bit-exactly and the error propagates. The delta's metadata names the
    method as registered here, its settings, the requests, the model, the edited layers, and the
    result (steps, time_s: the edit's wall time in s).

    history: for methods that carry one (`EditMethod.carries_history`, e.g. alphaedit), the state of the
    sequential run so far; it is not changed, the next one is `delta.records.history`.
    """
    chosen = get_method(method)
    if history is not None and not chosen.carries_history:
        raise ValueError(f"{method} carries no history across batches; history= is for "
                         f"{', '.join(n for n, m in METHODS.items() if m.carries_history)}")
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise ValueError("requests is empty; expected at least one EditRequest")
    settings = hparams.validate(lm) if hparams is not None else make_settings(lm, method, **overrides)
    names = chosen.parameters(lm, settings)
    offloaded = [n for n in names if lm.model.get_parameter(n).device.type == "meta"]
    if offloaded:
        raise EditError(f"{method} changes {offloaded[0]}, which the device map offloaded (not in memory); keep "
                        "the edit layers on a device (a device_map that does not offload them)")
    metadata: dict[str, Any] = {
        "method": method, "hparams": asdict(settings), "requests": [r.to_dict() for r in requests],
        "model_name": lm.name, "model_fingerprint": lm.fingerprint(), "kvedit_version": __version__,
        "layers": _layers_touched(lm, names),
        "compute_dtype": lm.compute_dtype,  # precision of the inner loops; the weights written are exact regardless
    }
    start = time.perf_counter()
    with WeightGuard(lm, names) as guard:
        outcome = chosen.run(lm, requests, settings, **({"history": history} if history is not None else {}))
        metadata["result"] = {"steps": outcome.steps, "time_s": time.perf_counter() - start, **outcome.result}
        delta = guard.finish(metadata)
    delta.records = outcome.records
    return delta


def prepare(lm: LM, method: str = "ft-keys", **overrides: Any) -> None:
    """Compute or load what every `edit(lm, ..., method, **overrides)` reuses, ahead of the edits
    (a no-op for fine-tuning)."""
    chosen = get_method(method)
    if chosen.prepare is not None:
        chosen.prepare(lm, make_settings(lm, method, **overrides))
