"""kvedit: locate, inspect, edit and tune the key-value memories of transformer FFN layers.

    import kvedit
    lm = kvedit.load_model()                      # bundled SmolLM2-135M-Instruct
    req = kvedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    delta = kvedit.edit(lm, req, method="ft-keys")  # edits in place
    delta.save("eiffel.safetensors"); delta.revert(lm)

The names are imported on first use, so `import kvedit` (and `kvedit --help`) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports
from .version import __version__

if TYPE_CHECKING:
    from .data import EditRequest, RequestError
    from .editing import METHODS, WeightDelta, edit
    from .evaluation import counterfact_case_metrics, summarize_counterfact
    from .models import LM, Trace, ffn_memory, load_model, memory_coefficients

_EXPORTS = {
    "EditRequest": ".data",
    "RequestError": ".data",
    "METHODS": ".editing",
    "WeightDelta": ".editing",
    "edit": ".editing",
    "counterfact_case_metrics": ".evaluation",
    "summarize_counterfact": ".evaluation",
    "LM": ".models",
    "Trace": ".models",
    "ffn_memory": ".models",
    "load_model": ".models",
    "memory_coefficients": ".models",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
