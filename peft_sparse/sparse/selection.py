"""Growth statistics for prune/regrow selection steps.

A selection step drops the active entries with the smallest ``|values|`` and grows
the same number of inactive entries ranked by a growth statistic gathered over an
accumulation window. A policy is a class with ``observe(left, right)`` (called in
backward; ``left @ right`` is the dense weight gradient of one micro-batch) and
``grow(count)`` (the flat indices to add, never already active).

Under torch.distributed (DDP) each process observes its own micro-batches. The statistics
are sums over micro-batches, so they are averaged over processes before choosing
(``process_sums``), which makes every rank grow the same entries; where a choice is made
inside the window (AG's candidates), the dense gradient is averaged first. ``state_dict``
/ ``load_state_dict`` carry an open window across a checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import torch

from triton_kernels import sampled_dense_dense_matmul, topk_candidates

from .distributed import all_reduce_sum_, gather_token_factors, world_size
from .indices import csr_pattern, index_dtype_for


class GrowthStatistics(Protocol):
    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None: ...

    def grow(self, count: int) -> torch.Tensor: ...

    def process_sums(self) -> list[torch.Tensor]:
        """The tensors that sum over this process's micro-batches (averaged over processes before ``grow``)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def top_inactive(score: torch.Tensor, active_indices: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted positions of the ``count`` largest entries of ``score`` (flat, >= 0) outside ``active_indices``.

    ``score`` is overwritten.
    """
    score[active_indices.long()] = -1.0
    count = min(count, score.numel() - active_indices.numel())
    return torch.topk(score, count, sorted=False).indices.sort().values


class CandidateGradientWindow:
    """Gradients summed over a window at candidate entries chosen on its first micro-batch.

    Subclasses choose the candidates in ``_open_window(left, right)`` (setting them with
    ``_set_candidates`` and ``accumulated`` to the first micro-batch's gradient there); later
    micro-batches add theirs by SDDMM, so no dense gradient outlives the first micro-batch.
    """

    def __init__(self, active_indices: torch.Tensor, weight_shape: tuple[int, int], num_candidates: int) -> None:
        self.active_indices = active_indices.clone()
        self.weight_shape = weight_shape
        self.num_candidates = num_candidates
        self.candidates: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None

    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None:
        if self.candidates is None:
            self._open_window(left, right)
        else:
            self.accumulated += sampled_dense_dense_matmul(left, right, self._crow, self._col)

    def _open_window(self, left: torch.Tensor, right: torch.Tensor) -> None:
        raise NotImplementedError

    def _set_candidates(self, candidates: torch.Tensor) -> None:
        self.candidates = candidates.to(index_dtype_for(self.weight_shape[0] * self.weight_shape[1]))
        self._crow, self._col = csr_pattern(self.candidates, self.weight_shape)

    def process_sums(self) -> list[torch.Tensor]:
        return [] if self.accumulated is None else [self.accumulated]


class AccumulatedGradientGrowth(CandidateGradientWindow):
    """SpIEL "AG": candidates = top-|grad| inactive entries of the window's first micro-batch;
    their gradients are summed over the window (by SDDMM, no dense gradient after the first
    micro-batch) and the largest ``|sum|`` grow.
    """

    def _open_window(self, left: torch.Tensor, right: torch.Tensor) -> None:
        if world_size() == 1:
            # a dense product (on CUDA scanned tile by tile, never stored)
            candidates, self.accumulated = topk_candidates(left, right, self.active_indices, self.num_candidates)
            self._set_candidates(candidates)
            return
        # every rank must pick the same candidates: from the gradient summed over ranks (one dense
        # all-reduce per matrix and window), while each rank accumulates its own share at them
        gradient = all_reduce_sum_(left.float() @ right.float())
        self._set_candidates(top_inactive(gradient.abs_().view(-1), self.active_indices, self.num_candidates))
        self.accumulated = sampled_dense_dense_matmul(left, right, self._crow, self._col)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.candidates is None:
            return {}
        return {"candidates": self.candidates, "accumulated": self.accumulated}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self._set_candidates(state["candidates"].to(self.active_indices.device))
            self.accumulated = state["accumulated"].to(self.active_indices.device, torch.float32)

    def grow(self, count: int) -> torch.Tensor:
        if self.candidates is None:
            return torch.empty(0, dtype=self.active_indices.dtype, device=self.active_indices.device)
        count = min(count, self.candidates.numel())
        best = torch.topk(self.accumulated.abs(), count, sorted=False).indices
        return self.candidates[best].to(self.active_indices.dtype)


def squared_product_sums(
    left: torch.Tensor, right: torch.Tensor, max_chunk_elements: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``(left @ right) ** 2`` (fp32) without holding the whole product.

    With few tokens (``inner``) the sums come from Gram matrices, ``row_i = l_i (R R^T) l_i^T`` and
    ``col_j = r_j^T (L^T L) r_j``, at ``2 * inner^2 * (rows + cols)`` flops; otherwise the product is
    formed ``max_chunk_elements`` at a time.

    Example:
        >>> left, right = torch.randn(6, 2), torch.randn(2, 5)
        >>> rows, cols = squared_product_sums(left, right)
        >>> torch.allclose(rows, (left @ right).square().sum(1), atol=1e-5)
        True
    """
    left, right = left.float(), right.float()
    (rows, inner), cols = left.shape, right.shape[1]
    if 2 * inner * (rows + cols) < rows * cols:
        row_sums = ((left @ (right @ right.T)) * left).sum(1)
        col_sums = (((left.T @ left) @ right) * right).sum(0)
        return row_sums.clamp_min_(0), col_sums.clamp_min_(0)  # rounding can dip just below zero
    row_sums = torch.empty(rows, dtype=torch.float32, device=left.device)
    col_sums = torch.zeros(cols, dtype=torch.float32, device=left.device)
    chunk = max(1, max_chunk_elements // max(cols, 1))
    for start in range(0, rows, chunk):
        squared = (left[start : start + chunk] @ right).square_()
        row_sums[start : start + chunk] = squared.sum(1)
        col_sums += squared.sum(0)
    return row_sums, col_sums


class MomentumApproximationGrowth:
    """SpIEL "MA" (SM3-style): row and column sums of squared gradients over the window;
    an inactive entry (i, j) scores ``row[i] * col[j]``. Memory O(rows + cols); the dense gradient
    is never held whole (``squared_product_sums``).
    """

    def __init__(self, active_indices: torch.Tensor, weight_shape: tuple[int, int]) -> None:
        self.active_indices = active_indices.clone()
        rows, cols = weight_shape
        self.row_statistics = torch.zeros(rows, dtype=torch.float32, device=active_indices.device)
        self.col_statistics = torch.zeros(cols, dtype=torch.float32, device=active_indices.device)
        self.observed = False

    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None:
        # squares of the global batch's gradient, not the mean of each rank's squares: every rank
        # gathers the token factors (activation-sized), so it scores what one process would
        row_sums, col_sums = squared_product_sums(*gather_token_factors(left, right))
        self.row_statistics += row_sums
        self.col_statistics += col_sums
        self.observed = True

    def process_sums(self) -> list[torch.Tensor]:
        return [self.row_statistics, self.col_statistics] if self.observed else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.observed:
            return {}
        return {"row_statistics": self.row_statistics, "col_statistics": self.col_statistics}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.row_statistics.copy_(state["row_statistics"])
            self.col_statistics.copy_(state["col_statistics"])
            self.observed = True

    def grow(self, count: int) -> torch.Tensor:
        if not self.observed:
            return torch.empty(0, dtype=self.active_indices.dtype, device=self.active_indices.device)
        score = torch.outer(self.row_statistics, self.col_statistics).view(-1)
        return top_inactive(score, self.active_indices, count).to(self.active_indices.dtype)


def smallest_magnitude_positions(values: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` entries of ``values`` with the smallest absolute value."""
    return torch.topk(values.detach().abs(), count, largest=False, sorted=False).indices


def smallest_weight_indices(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices [count] of the ``count`` entries of ``weight`` with the smallest ``|W0|`` (SaRA).

    Example:
        >>> smallest_weight_indices(torch.tensor([[0.5, -0.01], [0.2, 0.03]]), 2)
        tensor([1, 3], dtype=torch.int32)
    """
    smallest = torch.topk(weight.detach().float().abs().view(-1), count, largest=False, sorted=False).indices
    return smallest.sort().values.to(index_dtype_for(weight.numel()))
