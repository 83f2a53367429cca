"""Metrics: teacher-forced target scoring and the CounterFact probability metrics."""

from .counterfact import counterfact_case_metrics, summarize_counterfact
from .scoring import TokenScores, encode_target, score_targets, target_nll

__all__ = [
    "TokenScores",
    "counterfact_case_metrics",
    "encode_target",
    "score_targets",
    "summarize_counterfact",
    "target_nll",
]
