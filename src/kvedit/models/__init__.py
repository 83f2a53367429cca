"""Models: the architecture table, loading and caching, the FFN key-value view, tracing."""

from .architectures import ARCHITECTURES, Architecture, UnsupportedModelError, architecture_for, supported_families
from .cache import cache_dir
from .lm import LM
from .loading import ModelLoadError, load_model
from .memory import FFNMemory, ffn_memory, memory_coefficients
from .tracing import Addition, StopForward, Trace

__all__ = [
    "ARCHITECTURES",
    "Addition",
    "Architecture",
    "FFNMemory",
    "LM",
    "ModelLoadError",
    "StopForward",
    "Trace",
    "UnsupportedModelError",
    "architecture_for",
    "cache_dir",
    "ffn_memory",
    "load_model",
    "memory_coefficients",
    "supported_families",
]
