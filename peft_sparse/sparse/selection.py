"""Growth statistics for prune/regrow selection steps.

A selection step drops the active entries with the smallest ``|values|`` and grows
the same number of inactive entries ranked by a growth statistic gathered over an
accumulation window. A policy is a class with ``observe(left, right)`` (called in
backward; ``left @ right`` is the dense weight gradient of one micro-batch) and
``grow(count)`` (the flat indices to add, never already active).
"""

from __future__ import annotations

from typing import Protocol

import torch

from triton_kernels import sampled_dense_dense_matmul, topk_candidates

from .indices import csr_pattern, index_dtype_for


class GrowthStatistics(Protocol):
    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None: ...

    def grow(self, count: int) -> torch.Tensor: ...


def _inactive_mask(active_indices: torch.Tensor, num_entries: int) -> torch.Tensor:
    mask = torch.ones(num_entries, dtype=torch.bool, device=active_indices.device)
    mask[active_indices.long()] = False
    return mask


class AccumulatedGradientGrowth:
    """SpIEL "AG": candidates = top-|grad| inactive entries of the window's first micro-batch;
    their gradients are summed over the window (by SDDMM, no dense gradient after the first
    micro-batch) and the largest ``|sum|`` grow.
    """

    def __init__(self, active_indices: torch.Tensor, weight_shape: tuple[int, int], num_candidates: int) -> None:
        self.active_indices = active_indices.clone()
        self.weight_shape = weight_shape
        self.num_candidates = num_candidates
        self.candidates: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None

    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None:
        if self.candidates is not None:
            self.accumulated += sampled_dense_dense_matmul(left, right, self._crow, self._col)
            return
        # the window's first micro-batch: a dense product (on CUDA scanned tile by tile, never stored)
        candidates, self.accumulated = topk_candidates(left, right, self.active_indices, self.num_candidates)
        self.candidates = candidates.to(index_dtype_for(left.shape[0] * right.shape[1]))
        self._crow, self._col = csr_pattern(self.candidates, self.weight_shape)

    def grow(self, count: int) -> torch.Tensor:
        if self.candidates is None:
            return torch.empty(0, dtype=self.active_indices.dtype, device=self.active_indices.device)
        count = min(count, self.candidates.numel())
        best = torch.topk(self.accumulated.abs(), count, sorted=False).indices
        return self.candidates[best].to(self.active_indices.dtype)


class MomentumApproximationGrowth:
    """SpIEL "MA" (SM3-style): row and column sums of squared gradients over the window;
    an inactive entry (i, j) scores ``row[i] * col[j]``. Memory O(rows + cols).
    """

    def __init__(self, active_indices: torch.Tensor, weight_shape: tuple[int, int]) -> None:
        self.active_indices = active_indices.clone()
        rows, cols = weight_shape
        self.row_statistics = torch.zeros(rows, dtype=torch.float32, device=active_indices.device)
        self.col_statistics = torch.zeros(cols, dtype=torch.float32, device=active_indices.device)
        self.observed = False

    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None:
        squared = (left.float() @ right.float()).square_()  # [rows, cols], transient
        self.row_statistics += squared.sum(1)
        self.col_statistics += squared.sum(0)
        self.observed = True

    def grow(self, count: int) -> torch.Tensor:
        if not self.observed:
            return torch.empty(0, dtype=self.active_indices.dtype, device=self.active_indices.device)
        score = torch.outer(self.row_statistics, self.col_statistics).view(-1)
        score.masked_fill_(~_inactive_mask(self.active_indices, score.numel()), -1.0)
        count = min(count, score.numel() - self.active_indices.numel())
        return torch.topk(score, count, sorted=False).indices.to(self.active_indices.dtype)


def smallest_magnitude_positions(values: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` entries of ``values`` with the smallest absolute value."""
    return torch.topk(values.detach().abs(), count, largest=False, sorted=False).indices
