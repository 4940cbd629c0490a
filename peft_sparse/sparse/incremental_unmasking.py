"""ID3's incremental unmasking ("Step-by-Step Unmasking for Parameter-Efficient Fine-tuning", Agarwal et al.).

Every slot of a layer starts masked: value 0, frozen (:mod:`.frozen_slots`). At an unmasking step the
masked entries with the largest D3 score ``|grad| / (epsilon + |W|) ** exponent`` take masked slots,
and their number grows linearly with the step until the layer's budget is reached at the last step.
The score's gradient is the step's own (summed over its micro-batches): candidates are the best D3
scores of its first micro-batch, their gradient is summed over the rest by SDDMM (as AG does), so the
dense gradient is never kept beyond one micro-batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from triton_kernels import sampled_dense_dense_matmul

from .distributed import all_reduce_sum_, world_size
from .selection import CandidateGradientWindow, top_inactive


def d3_score(gradient: torch.Tensor, weight: torch.Tensor, epsilon: float, exponent: float) -> torch.Tensor:
    """ID3's D3 importance ``|gradient| / (epsilon + |weight|) ** exponent`` (fp32, elementwise).

    Example:
        >>> d3_score(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]), epsilon=1.0, exponent=1.0)
        tensor([1.0000, 0.5000])
    """
    return gradient.float().abs() / (epsilon + weight.float().abs()).pow(exponent)


def unmasked_count(budget: int, step: int, max_steps: int) -> int:
    """How many of ``budget`` entries ID3 has unmasked after optimizer step ``step`` (1-based) of ``max_steps``.

    ``budget // max_steps`` per step, one more in each of the first ``budget % max_steps`` steps (the
    reference schedule); all of them from ``max_steps`` on.

    Example:
        >>> [unmasked_count(10, step, 4) for step in range(5)]
        [0, 3, 6, 8, 10]
    """
    step = min(max(step, 0), max_steps)
    return budget // max_steps * step + min(step, budget % max_steps)


class D3Growth(CandidateGradientWindow):
    """Statistics of one unmasking step: the masked entries with the largest D3 score of the step's gradient.

    ``unmasked_indices`` are excluded (masked slots' own indices are candidates: their value is 0).
    ``weight_of()`` gives the stored weight ``W`` (dequantized for a quantized base): at every entry
    that is not unmasked it is ``W0``, since masked slots hold 0.
    """

    def __init__(
        self,
        unmasked_indices: torch.Tensor,
        weight_shape: tuple[int, int],
        weight_of: Callable[[], torch.Tensor],
        epsilon: float,
        exponent: float,
        num_candidates: int,
    ) -> None:
        super().__init__(unmasked_indices, weight_shape, num_candidates)
        self.weight_of = weight_of
        self.epsilon, self.exponent = epsilon, exponent

    def _open_window(self, left: torch.Tensor, right: torch.Tensor) -> None:
        gradient = left.float() @ right.float()  # the step's first micro-batch: one dense product, then dropped
        if world_size() > 1:  # every rank must choose the same candidates: from the gradient summed over ranks
            all_reduce_sum_(gradient)
        score = d3_score(gradient, self.weight_of(), self.epsilon, self.exponent).view(-1)
        self._set_candidates(top_inactive(score, self.active_indices, self.num_candidates))
        self.accumulated = sampled_dense_dense_matmul(left, right, self._crow, self._col)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # a window lasts one step and no checkpoint falls inside a step

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def grow_with_gradients(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted flat indices of the ``count`` best D3 scores among the candidates, and their summed gradients."""
        if self.candidates is None or count == 0:
            empty = torch.empty(0, dtype=self.active_indices.dtype, device=self.active_indices.device)
            return empty, torch.empty(0, dtype=torch.float32, device=empty.device)
        weight = self.weight_of().reshape(-1)[self.candidates.long()]
        score = d3_score(self.accumulated, weight, self.epsilon, self.exponent)
        best = torch.topk(score, min(count, score.numel()), sorted=False).indices
        order = torch.argsort(self.candidates[best].long())
        best = best[order]
        return self.candidates[best].to(self.active_indices.dtype), self.accumulated[best]
