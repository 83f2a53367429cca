"""A running top-k per memory over a stream of coefficient batches, on the device, in `k × d` memory.

Each batch is screened against the current k-th best score of every memory first (one comparison pass), so
only the few places that can still enter a memory's top-k are gathered and merged; until the top-k fills
up, the batch's own k-th best tightens that threshold. Ties are broken towards the smaller code (the earlier
place in the corpus), so the result is the top-k by (score, then code) whatever the batch sizes or order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Rank = Literal["value", "abs"]


@dataclass
class RunningTopK:
    """The `k` best scores per memory seen so far and where they were seen, all `[d, k]` on the device.

    scores: the ranking score (the coefficient, or its absolute value), descending along k;
    coefficients: the signed coefficient; codes: `sequence * stride + position`, -1 where empty.
    """

    scores: torch.Tensor
    coefficients: torch.Tensor
    codes: torch.Tensor

    @classmethod
    def empty(cls, d: int, k: int, device: torch.device) -> "RunningTopK":
        return cls(
            torch.full((d, k), float("-inf"), device=device),
            torch.zeros((d, k), device=device),
            torch.full((d, k), -1, dtype=torch.long, device=device),
        )

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    @property
    def d(self) -> int:
        return self.scores.shape[0]

    def update(
        self, coefficients: torch.Tensor, codes: torch.Tensor, rank: Rank = "value", valid: torch.Tensor | None = None
    ) -> None:
        """Merge a batch: `coefficients` `[N, d]` (any float dtype) at the places `codes` `[N]` (0 ≤ code < 2³²
        − 1); rows where `valid` `[N]` (bool) is False (padding, special tokens) are skipped."""
        if coefficients.dim() != 2 or coefficients.shape[1] != self.d or codes.shape != coefficients.shape[:1]:
            raise ValueError(
                f"expected coefficients [N, {self.d}] and codes [N]; got {tuple(coefficients.shape)} "
                f"and {tuple(codes.shape)}"
            )
        if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) <= 2**32 - 2:
            raise ValueError(f"codes must lie in 0..2^32-2, got {int(codes.min())}..{int(codes.max())}")
        coefficients = coefficients.float()
        scores = coefficients if rank == "value" else coefficients.abs()
        flat = (scores >= self._threshold(scores, valid)).view(-1).nonzero().squeeze(1)
        rows, mem = flat // self.d, flat % self.d
        if valid is not None:
            keep = valid[rows]
            rows, mem = rows[keep], mem[keep]
        if rows.numel() == 0:
            return
        # lay the candidates out as [d, c], one row per memory, c = the most candidates any memory has
        mem, order = torch.sort(mem)
        rows = rows[order]
        counts = torch.bincount(mem, minlength=self.d)
        slot = torch.arange(mem.numel(), device=mem.device) - (counts.cumsum(0) - counts)[mem]
        width = int(counts.max())
        new_scores = scores.new_full((self.d, width), float("-inf")).index_put_((mem, slot), scores[rows, mem])
        new_codes = codes.new_full((self.d, width), -1).index_put_((mem, slot), codes[rows])
        new_coefs = (
            new_scores
            if rank == "value"
            else coefficients.new_zeros((self.d, width)).index_put_((mem, slot), coefficients[rows, mem])
        )
        self._merge(new_scores, new_coefs, new_codes)

    def _threshold(self, scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """`[d]`: the score a place must reach to be a candidate, the current k-th best (ties included); while
        the top-k is not full, at least the batch's own k-th best."""
        threshold = self.scores[:, -1]
        if torch.isinf(threshold).any():
            pool = scores if valid is None else scores[valid]
            if pool.shape[0] > self.k:
                threshold = torch.maximum(threshold, pool.topk(self.k, dim=0).values[-1])
        return threshold

    def _merge(self, scores: torch.Tensor, coefficients: torch.Tensor, codes: torch.Tensor) -> None:
        """Keep the k best of the current entries and `[d, c]` new ones, by score, then by smaller code."""
        all_scores = torch.cat([self.scores, scores], dim=1)
        all_codes = torch.cat([self.codes, codes], dim=1)
        best = order_key(all_scores, all_codes).topk(self.k, dim=1).indices  # keys are distinct: no ties
        self.scores = all_scores.gather(1, best)
        self.coefficients = torch.cat([self.coefficients, coefficients], dim=1).gather(1, best)
        self.codes = all_codes.gather(1, best)


def order_key(scores: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """One int64 per entry that orders by float32 `scores` (ascending) and then by `codes` (descending), so
    its largest values are the best scores, earliest first. codes: -1 (empty) to 2³² − 2."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE-754 bits → an int32 order that matches the float order
    return ordered.long() * 2**32 + (2**32 - 2 - codes)
