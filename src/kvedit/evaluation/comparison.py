"""Uncertainty of benchmark means and paired comparisons between methods run on the same cases.

- `bootstrap_ci`: percentile bootstrap interval of any statistic of per-case records.
- `sign_test`: exact two-sided binomial sign test on paired differences (ties dropped).
- `paired_comparison`: mean difference of a metric between two methods over their shared cases,
  with a paired bootstrap interval and the sign test's p-value.

Resampling uses a seeded NumPy generator, so the same records always give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Statistic = Callable[[np.ndarray], float]  # indices of resampled cases -> value


def bootstrap_ci(
    statistic: Statistic, n: int, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """(low, high) percentile interval of `statistic` over `resamples` resamples of `n` cases.

    None when there are fewer than two cases (no interval can be estimated).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_ci(values: Sequence[float], scale: float = 1.0, **kwargs: Any) -> dict[str, Any]:
    """{"mean", "ci": [low, high] | None, "count"} of `values` × `scale`."""
    array = np.asarray(values, dtype=float) * scale
    if array.size == 0:
        return {"mean": None, "ci": None, "count": 0}
    ci = bootstrap_ci(lambda idx: float(array[idx].mean()), array.size, **kwargs)
    return {"mean": float(array.mean()), "ci": list(ci) if ci else None, "count": int(array.size)}


def sign_test(differences: Sequence[float]) -> float | None:
    """Exact two-sided sign-test p-value of paired differences; zeros are ties and dropped.

    None when every difference is a tie (nothing to test).
    """
    positive = sum(1 for d in differences if d > 0)
    negative = sum(1 for d in differences if d < 0)
    n = positive + negative
    if n == 0:
        return None
    k = min(positive, negative)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(a: Sequence[float], b: Sequence[float], scale: float = 1.0, **kwargs: Any) -> dict[str, Any]:
    """Paired difference a − b (× `scale`) over cases given in the same order in both lists.

    Returns {"mean_difference", "ci", "sign_test_p", "wins", "losses", "ties", "count"}.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values must have equal lengths, got {len(a)} and {len(b)}")
    diff = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * scale
    if diff.size == 0:
        return {"mean_difference": None, "ci": None, "sign_test_p": None, "wins": 0, "losses": 0, "ties": 0, "count": 0}
    ci = bootstrap_ci(lambda idx: float(diff[idx].mean()), diff.size, **kwargs)
    return {
        "mean_difference": float(diff.mean()),
        "ci": list(ci) if ci else None,
        "sign_test_p": sign_test(diff.tolist()),
        "wins": int((diff > 0).sum()),
        "losses": int((diff < 0).sum()),
        "ties": int((diff == 0).sum()),
        "count": int(diff.size),
    }
