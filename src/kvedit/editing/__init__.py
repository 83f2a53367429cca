"""Editors: each turns (model, requests, hparams) into an in-place edit and its `WeightDelta`.

Names are imported on first use (`kvedit.lazy`), so `kvedit.editing.method_names` is torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .delta import EditError, PatchMismatchError, WeightDelta, WeightGuard
    from .finetune import FT_PRESETS, FTHyperParams, finetune_edit
    from .registry import METHODS, EditMethod, edit, get_method, make_settings, prepare

_EXPORTS = {
    "EditError": ".delta",
    "PatchMismatchError": ".delta",
    "WeightDelta": ".delta",
    "WeightGuard": ".delta",
    "FT_PRESETS": ".finetune",
    "FTHyperParams": ".finetune",
    "finetune_edit": ".finetune",
    "METHODS": ".registry",
    "EditMethod": ".registry",
    "edit": ".registry",
    "get_method": ".registry",
    "make_settings": ".registry",
    "prepare": ".registry",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
