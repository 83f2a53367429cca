"""Metrics: teacher-forced target scoring and the CounterFact probability metrics.

The names below are imported on first use (`kvedit.lazy`), so the reports, which read only summaries, load no
torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .counterfact import counterfact_case_metrics, summarize_counterfact
    from .scoring import TokenScores, encode_target, score_targets, target_nll

_EXPORTS = {
    "TokenScores": ".scoring",
    "counterfact_case_metrics": ".counterfact",
    "encode_target": ".scoring",
    "score_targets": ".scoring",
    "summarize_counterfact": ".counterfact",
    "target_nll": ".scoring",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
