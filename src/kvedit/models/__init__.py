"""Models: the architecture table, loading and caching, the FFN key-value view, tracing.

The names below are imported on first use (`kvedit.lazy`): `kvedit.models.cache` alone loads no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .architectures import (
        ARCHITECTURES,
        Architecture,
        UnsupportedModelError,
        architecture_for,
        supported_families,
    )
    from .cache import cache_dir
    from .lm import LM
    from .loading import ModelLoadError, load_model
    from .memory import FFNMemory, ffn_memory, memory_coefficients
    from .tracing import Addition, StopForward, Trace

_EXPORTS = {
    "ARCHITECTURES": ".architectures",
    "Addition": ".tracing",
    "Architecture": ".architectures",
    "FFNMemory": ".memory",
    "LM": ".lm",
    "ModelLoadError": ".loading",
    "StopForward": ".tracing",
    "Trace": ".tracing",
    "UnsupportedModelError": ".architectures",
    "architecture_for": ".architectures",
    "cache_dir": ".cache",
    "ffn_memory": ".memory",
    "load_model": ".loading",
    "memory_coefficients": ".memory",
    "supported_families": ".architectures",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
