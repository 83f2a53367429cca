"""The table of editing methods: every editor the CLI, the demo and benchmarks can name."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from ..data.requests import EditRequest
from ..models.lm import LM
from ..version import __version__
from .delta import EditError, WeightDelta, WeightGuard
from .finetune import FT_PRESETS, FTHyperParams, finetune_edit, finetune_parameters
from .alphaedit import ALPHAEDIT_PRESETS, AlphaEditHyperParams, alphaedit_edit, alphaedit_parameters, alphaedit_prepare
from .hparams import ClosedFormHyperParams, EditorSettings, EditOutcome
from .kn import KN_PRESETS, KNHyperParams, kn_edit, kn_parameters
from .tpatcher import TPATCHER_PRESETS, TPatcherHyperParams, tpatcher_edit, tpatcher_parameters, tpatcher_prepare
from .memit import MEMIT_PRESETS, MEMITHyperParams, memit_edit, memit_parameters, memit_prepare, memit_target_plan
from .pmet import PMET_PRESETS, PMETHyperParams, pmet_edit, pmet_parameters, pmet_prepare, pmet_target_plan
from .target_store import open_store
from .targets import GROUP_SIZE, TargetPlan
from .presets import PresetTable, ft_model_presets, given_overrides, make_hparams, model_row
from .rome import ROME_PRESETS, ROMEHyperParams, rome_edit, rome_parameters, rome_prepare, rome_target_plan

S = TypeVar("S", bound=EditorSettings)
C = TypeVar("C", bound=ClosedFormHyperParams)


def _no_rows() -> Collection[str]:
    return ()


@dataclass(frozen=True)
class EditMethod(Generic[S]):
    """A named editor. The registry's `edit` does what every editor needs (checks, timing, the weight
    guard, the patch metadata); an editor only computes its update:

    build(lm, preset=None, **given): its settings from a preset and the settings a caller gave (no None
    values: `make_hparams` drops those first); `parameters(lm, hp)`: the names of the weights it may change;
    `run(lm, requests, hp)`: change them in place and return an `EditOutcome`; `prepare(lm, hp)`: compute or
    load once what every edit with those settings reuses (key statistics, context templates), so that an
    edit's time is its own; `model_rows()`: the MODEL_PRESETS rows its tables hold a row for.

    Overrides every method accepts: preset, layers, lr, max_steps (`presets`: the names a preset may take).
    target_plan(lm, hp): for editors that optimise target vectors from the weights they start on (ROME, MEMIT,
    PMET, AlphaEdit), their sites, templates and options (`optimize_edit_targets`).
    carries_history: `run` also takes `history=` (state a sequential run carries from batch to batch, e.g.
    AlphaEdit's Σ K Kᵀ) and returns the next one in its outcome's records (`records.history`).
    """

    name: str
    summary: str
    build: Callable[..., S]
    parameters: Callable[[LM, S], list[str]]
    run: Callable[..., EditOutcome]
    prepare: Callable[[LM, S], None] | None = None
    presets: tuple[str, ...] = ()
    carries_history: bool = False
    uses_statistics: bool = False  # reads key statistics (stats_source / stats_tokens settings, `prepare`)
    follows_compute_dtype: bool = True  # its inner loops run in `lm.compute_dtype` (`models.compute`)
    model_rows: Callable[[], Collection[str]] = _no_rows
    target_plan: Callable[[LM, S], TargetPlan] | None = None  # the target vectors `run` optimises (closed forms)

    def make_hparams(self, lm: LM | None, **overrides: Any) -> S:
        """Its settings for `lm` from the preset and `overrides` (None: the preset's value), not yet checked."""
        return self.build(lm, **given_overrides(overrides))


def _finetune(name: str, target: str, summary: str) -> EditMethod[FTHyperParams]:
    def build(lm: LM | None, preset: str | None = None, **given: Any) -> FTHyperParams:
        if "target" in given:
            raise ValueError(f"{name} fine-tunes the {target} target; choose the method for another target")
        # with no preset named, the row chosen for this model (FT_MODEL_PRESETS) is laid over "default"
        return make_hparams(
            FTHyperParams, FT_PRESETS, preset, lm, model_rows=ft_model_presets(target), target=target, **given
        )

    return EditMethod(
        name,
        summary,
        build,
        finetune_parameters,
        finetune_edit,
        presets=tuple(FT_PRESETS),
        model_rows=lambda: ft_model_presets(target),
    )


def _from_table(cls: type[S], presets: PresetTable, **fixed: Any) -> Callable[..., S]:
    """The settings builder of an editor whose table has rows per family and per model (`default_preset`)."""

    def build(lm: LM | None, preset: str | None = None, **given: Any) -> S:
        return make_hparams(cls, presets, preset, lm, **{**fixed, **given})  # a setting the caller gives wins

    return build


def _kn() -> EditMethod[KNHyperParams]:
    return EditMethod(
        "kn",
        "knowledge neurons of the true object: their value rows moved towards the new "
        "object's embedding (EasyEdit's KN)",
        _from_table(KNHyperParams, KN_PRESETS),
        kn_parameters,
        kn_edit,
        presets=tuple(KN_PRESETS),
        model_rows=lambda: KN_PRESETS,
        follows_compute_dtype=False,
    )


def _closed_form(
    name: str,
    cls: type[S],
    presets: PresetTable,
    parameters: Callable[[LM, S], list[str]],
    run: Callable[..., EditOutcome],
    prepare: Callable[[LM, S], None],
    target_plan: Callable[[LM, S], TargetPlan] | None,
    summary: str,
    **fixed: Any,
) -> EditMethod[S]:
    return EditMethod(
        name,
        summary,
        _from_table(cls, presets, **fixed),
        parameters,
        run,
        prepare,
        presets=tuple(presets),
        uses_statistics=True,
        model_rows=lambda: presets,
        target_plan=target_plan,
    )


_ROME = (ROMEHyperParams, ROME_PRESETS, rome_parameters, rome_edit, rome_prepare, rome_target_plan)
_MEMIT = (MEMITHyperParams, MEMIT_PRESETS, memit_parameters, memit_edit, memit_prepare, memit_target_plan)
_PMET = (PMETHyperParams, PMET_PRESETS, pmet_parameters, pmet_edit, pmet_prepare, pmet_target_plan)
_ALPHAEDIT = (
    AlphaEditHyperParams,
    ALPHAEDIT_PRESETS,
    alphaedit_parameters,
    alphaedit_edit,
    alphaedit_prepare,
    memit_target_plan,
)

#: The `-fast` variants (not the reference algorithm): the preset's learning rate × FAST_LR_FACTOR, and each request
#: stops once target_new's mean NLL is below FAST_STOP_NLL nats. Chosen from traces of the optimisation on
#: CounterFact cases outside the README's tables; the paired comparison with the reference rule is in the README.
FAST_LR_FACTOR = 2.0
FAST_STOP_NLL = 0.1


def _fast(base: EditMethod[C]) -> EditMethod[C]:
    def build(lm: LM | None, preset: str | None = None, **given: Any) -> C:
        hp = base.build(lm, preset, **given)
        return replace(
            hp,
            lr=hp.lr if "lr" in given else hp.lr * FAST_LR_FACTOR,
            stop_nll=hp.stop_nll if "stop_nll" in given else FAST_STOP_NLL,
        )

    summary = (
        f"{base.name.upper()} with a faster target optimisation (lr ×{FAST_LR_FACTOR:g}, stop at NLL < {FAST_STOP_NLL})"
    )
    return replace(base, name=f"{base.name}-fast", summary=summary, build=build)


_ROME_METHOD = _closed_form("rome", *_ROME, "rank-one update of one layer's values")
_MEMIT_METHOD = _closed_form("memit", *_MEMIT, "batch update spread over layers")

METHODS: Mapping[str, EditMethod[Any]] = MappingProxyType(
    {
        m.name: m
        for m in (
            _finetune("ft-keys", "keys", "fine-tune the FFN keys (gate and up when gated)"),
            _finetune("ft-key-gate", "key:gate", "fine-tune only the gate keys (gated FFNs)"),
            _finetune("ft-key-up", "key:up", "fine-tune only the up keys (gated FFNs)"),
            _finetune("ft-values", "values", "fine-tune the FFN values (down projection)"),
            _ROME_METHOD,
            _MEMIT_METHOD,
            _closed_form("pmet", *_PMET, "attention+FFN targets, FFN-only update, √ spread"),
            _closed_form("pmet-no-attn-delta", *_PMET, "PMET ablation: optimise the FFN delta alone", attn_delta=False),
            _closed_form(
                "pmet-update-attn", *_PMET, "PMET ablation: also update the attention output weights", update_attn=True
            ),
            _closed_form("pmet-even-spread", *_PMET, "PMET ablation: MEMIT's even spread", spread="even"),
            replace(
                _closed_form(
                    "alphaedit", *_ALPHAEDIT, "MEMIT's targets, update projected onto the null space of preserved keys"
                ),
                carries_history=True,
            ),
            _fast(_ROME_METHOD),
            _fast(_MEMIT_METHOD),
            _kn(),
            replace(
                _closed_form(
                    "t-patcher",
                    TPatcherHyperParams,
                    TPATCHER_PRESETS,
                    tpatcher_parameters,
                    tpatcher_edit,
                    tpatcher_prepare,
                    None,
                    "adds memories (a key and a value each) to the last FFN layer, one per "
                    "mistaken target token (T-Patcher)",
                ),
                follows_compute_dtype=False,
            ),
        )
    }
)


def get_method(name: str) -> EditMethod[Any]:
    if name not in METHODS:
        raise ValueError(f"unknown editing method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def chosen_for_model(lm: LM, method: str) -> bool:
    """Whether `method`'s default settings for `lm` were chosen for this very model (its MODEL_PRESETS row in the
    method's table, or in FT_MODEL_PRESETS for fine-tuning; benchmarks/select_presets.py), not its family's."""
    return model_row(lm) in get_method(method).model_rows()


def make_settings(lm: LM | None, method: str, **overrides: Any) -> EditorSettings:
    """The settings `edit(lm, …, method, **overrides)` would use, checked: the one path from overrides to
    settings (`EditMethod.make_hparams`, then `validate`).

    With `lm` None only what needs no model is checked (method, preset, setting names and ranges), so a
    command can refuse bad input before loading anything; with a model, layers and modules too, and the result
    can be given to `edit(..., hparams=)` as it is. Overrides that are None mean "the preset's value". A model
    set to compute in bfloat16 is refused for a method whose loops run in float32 only (KN, T-Patcher).
    """
    chosen = get_method(method)
    if lm is not None and lm.compute_dtype != "float32" and not chosen.follows_compute_dtype:
        raise ValueError(
            f"{method} runs in float32 only; --compute-dtype {lm.compute_dtype} applies to "
            f"{', '.join(n for n, m in METHODS.items() if m.follows_compute_dtype)}"
        )
    return chosen.make_hparams(lm, **overrides).validate(lm)


def _layers_touched(lm: LM, names: Sequence[str]) -> list[int]:
    """Layer numbers of the parameters an edit changed (from their dotted names)."""
    prefix = lm.arch.layers + "."
    return sorted({int(n[len(prefix) :].split(".")[0]) for n in names if n.startswith(prefix)})


def edit(
    lm: LM,
    requests: EditRequest | Sequence[EditRequest],
    method: str = "ft-keys",
    hparams: EditorSettings | None = None,
    history: Any | None = None,
    **overrides: Any,
) -> WeightDelta:
    """Edit `requests` into `lm` in place with `method`; return the exact, reversible `WeightDelta`.

    hparams: settings `make_settings(lm, method, …)` returned, used as they are (they were checked there);
    otherwise `make_settings(lm, method, **overrides)`: the method's preset (`preset=...`, default: the one
    chosen for the model) with `overrides`. On any failure (Ctrl-C, NaN/Inf weights included)
    the weights are restored bit-exactly and the error propagates. The delta's metadata names the
    method as registered here, its settings, the requests, the model, the edited layers, and the
    result (steps, time_s: the edit's wall time in s).

    history: for methods that carry one (`EditMethod.carries_history`, e.g. alphaedit), the state of the
    sequential run so far; it is not changed, the next one is `delta.records.history`.
    """
    chosen = get_method(method)
    if history is not None and not chosen.carries_history:
        raise ValueError(
            f"{method} carries no history across batches; history= is for "
            f"{', '.join(n for n, m in METHODS.items() if m.carries_history)}"
        )
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise ValueError("requests is empty; expected at least one EditRequest")
    settings = hparams if hparams is not None else make_settings(lm, method, **overrides)
    names = chosen.parameters(lm, settings)
    if not names:
        raise EditError(
            f"{method}'s settings name no weights to change; make them with make_settings(lm, {method!r}, ...)"
        )
    offloaded = [n for n in names if lm.model.get_parameter(n).device.type == "meta"]
    if offloaded:
        raise EditError(
            f"{method} changes {offloaded[0]}, which the device map offloaded (not in memory); keep "
            "the edit layers on a device (a device_map that does not offload them)"
        )
    metadata: dict[str, Any] = {
        "method": method,
        "hparams": asdict(settings),
        "requests": [r.to_dict() for r in requests],
        "model_name": lm.name,
        "model_fingerprint": lm.fingerprint(),
        "kvedit_version": __version__,
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


def optimize_edit_targets(
    lm: LM, calls: Sequence[Sequence[EditRequest]], method: str, group_size: int = GROUP_SIZE, **overrides: Any
) -> int:
    """Optimise ahead, in groups of up to `group_size`, the target vectors that `edit(lm, call, method,
    **overrides)` would optimise from these weights for each call in `calls`, into the `reused_targets` store
    open on `lm`: each such edit then takes its own from the store, at its share of its group's time. A request's
    targets never depend on the others optimised beside it, so they are those of one-at-a-time optimisation.
    For an editor that applies a call's requests in turn (ROME) only each call's first request is optimised.
    Returns the number of requests optimised or found; 0 for an editor with no target vectors (fine-tuning, KN,
    T-Patcher)."""
    target_plan = get_method(method).target_plan
    if target_plan is None:
        return 0
    if open_store(lm) is None:
        raise RuntimeError("optimize_edit_targets stores what it optimises: call it inside reused_targets(lm)")
    plan = target_plan(lm, make_settings(lm, method, **overrides))
    requests = [r for call in calls for r in (call[:1] if plan.in_turn else call)]
    plan.optimize(lm, requests, group_size)
    return len(requests)
