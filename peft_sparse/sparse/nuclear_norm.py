"""SaRA's low-rank regulariser: the gradient of ``weight * ||delta||_*`` with respect to a sparse delta's values."""

from __future__ import annotations

import torch


def nuclear_norm_gradient(delta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``d ||delta||_* / d values`` [k] for the entries of ``delta`` [m, n] at flat ``indices`` [k] (fp32).

    The gradient of the nuclear norm is ``U V^T`` over the nonzero singular values (the usual
    rank tolerance); at ``delta = 0`` it is 0, the smallest subgradient.

    Example:
        >>> delta = torch.diag(torch.tensor([2.0, -3.0]))
        >>> nuclear_norm_gradient(delta, torch.tensor([0, 3]))
        tensor([ 1., -1.])
    """
    wide = delta.shape[0] < delta.shape[1]
    # LAPACK's SVD of a tall matrix: 746 ms for [576, 1536], 399 ms for its transpose (one CPU thread)
    matrix = (delta.T if wide else delta).detach().float()
    left, singular, right_h = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = singular.max().clamp_min(torch.finfo(torch.float32).tiny) * max(matrix.shape) * torch.finfo(torch.float32).eps
    rank = int((singular > tolerance).sum())
    if rank == 0:
        return torch.zeros(indices.numel(), dtype=torch.float32, device=delta.device)
    gradient = left[:, :rank] @ right_h[:rank]
    return (gradient.T if wide else gradient).reshape(-1)[indices.long()]
