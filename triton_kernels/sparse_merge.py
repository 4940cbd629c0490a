"""Sparse merge: write ``base_values + values`` into a dense weight at flat indices."""

from __future__ import annotations

import torch


@torch.no_grad()
def scatter_assign(
    weight: torch.Tensor, indices: torch.Tensor, base_values: torch.Tensor, values: torch.Tensor
) -> None:
    """Set ``weight.view(-1)[indices] = base_values + values`` in place.

    Shapes: ``weight`` any contiguous shape with N entries, ``indices`` [k]
    (int32 or int64, unique), ``base_values`` [k] in the weight's dtype,
    ``values`` [k] (any float dtype; the sum is taken in fp32, then rounded
    once to the weight's dtype).

    Example:
        >>> w = torch.zeros(2, 3)
        >>> scatter_assign(w, torch.tensor([1, 5]), torch.zeros(2), torch.tensor([1.0, 2.0]))
        >>> w.view(-1).tolist()
        [0.0, 1.0, 0.0, 0.0, 0.0, 2.0]
    """
    if indices.numel() == 0:
        return
    merged = (base_values.float() + values.float()).to(weight.dtype)
    weight.view(-1).index_copy_(0, indices.long(), merged)
