"""SoRA's ``add_weighted_adapter`` math, as peft's LoRA does it, with each gate folded into its ``B``.

A SoRA delta is ``s * B diag(g) A``; with ``B_g = B diag(g)`` it is the LoRA delta ``s * B_g A``, so
the sources are combined like LoRA adapters and the result has gate ones and scale 1 (``alpha = r``):

* ``"cat"``: ranks stacked (``r = sum r_i``): exact, ``sum(w_i * delta_i)``;
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: peft's merge
  rules on the ``A`` and ``B_g`` factors separately, each weighted by ``sqrt(|w_i s_i|)`` (the sign on
  ``A``); the sources need equal ranks; an approximation, as for LoRA;
* ``"svd"`` and the ``"*_svd"`` variants: the rule on the dense deltas, then a truncated SVD of rank
  ``svd_rank`` (default: the largest source rank); exact when ``svd_rank`` covers the combined rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties

FACTOR_MERGES = {
    "linear": task_arithmetic, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}  # fmt: skip
DENSE_MERGES = {
    "svd": task_arithmetic, "ties_svd": ties, "dare_linear_svd": dare_linear, "dare_ties_svd": dare_ties,
    "magnitude_prune_svd": magnitude_prune,
}  # fmt: skip
SORA_COMBINATION_TYPES = ("cat", *FACTOR_MERGES, *DENSE_MERGES)


def combined_rank(combination_type: str, ranks: list[int], svd_rank: Optional[int]) -> int:
    """Rank of the combined adapter; raise ValueError for unequal ranks where they must match, or a bad ``svd_rank``."""
    if svd_rank is not None and combination_type not in DENSE_MERGES:
        raise ValueError(
            f"svd_rank is only used with combination_type in {tuple(DENSE_MERGES)}, got {combination_type!r}"
        )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in DENSE_MERGES:
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(
            f"combination_type={combination_type!r} needs adapters of equal rank r, got ranks {ranks}; use 'cat' "
            "or 'svd' for different ranks"
        )
    return ranks[0]


def _merge(rule, tensors: list[torch.Tensor], weights: torch.Tensor, density, majority_sign_method) -> torch.Tensor:
    if rule is task_arithmetic:
        return rule(tensors, weights)
    if rule in (ties, dare_ties):
        return rule(tensors, weights, density, majority_sign_method)
    return rule(tensors, weights, density)


def combine_sora_factors(
    combination_type: str,
    factors: list[tuple[torch.Tensor, torch.Tensor, float]],
    weights: list[float],
    rank: int,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [rank, in], B [out, rank])`` with product the combined delta, from factors ``(A_i, B_i diag(g_i), s_i)``.

    Example:
        >>> a, b = torch.randn(2, 5), torch.randn(3, 2)
        >>> new_a, new_b = combine_sora_factors("cat", [(a, b, 0.5), (a, b, 0.5)], [1.0, 1.0], rank=4)
        >>> torch.allclose(new_b @ new_a, b @ a)
        True
    """
    device = factors[0][0].device
    if combination_type == "cat":
        new_a = torch.cat([a * (w * s) for (a, _, s), w in zip(factors, weights)])
        return new_a, torch.cat([gated_b for _, gated_b, _ in factors], dim=1)
    if combination_type in DENSE_MERGES:
        deltas = [(gated_b @ a) * s for a, gated_b, s in factors]  # [out, in]
        weight_tensor = torch.tensor(weights, device=device)
        delta = _merge(DENSE_MERGES[combination_type], deltas, weight_tensor, density, majority_sign_method)
        u, singular_values, vh = torch.linalg.svd(delta, full_matrices=False)
        kept = min(rank, singular_values.numel())
        new_a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=device)
        new_b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=device)
        new_a[:kept], new_b[:, :kept] = vh[:kept], u[:, :kept] * singular_values[:kept]
        return new_a, new_b
    scaled = [w * s for (_, _, s), w in zip(factors, weights)]
    # the sign goes on A only
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled], device=device)
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled], device=device)
    rule = FACTOR_MERGES[combination_type]
    new_a = _merge(rule, [a for a, _, _ in factors], weights_a, density, majority_sign_method)
    new_b = _merge(rule, [gated_b for _, gated_b, _ in factors], weights_b, density, majority_sign_method)
    return new_a, new_b
