"""Sampled dense-dense matmul (SDDMM): entries of ``left @ right`` at a CSR pattern."""

from __future__ import annotations

import warnings

import torch

# torch warns once that CSR support is "beta"; we rely only on sampled_addmm, tested here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def sampled_dense_dense_matmul(
    left: torch.Tensor, right: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """Return ``(left @ right)[row_t, col_t]`` for every entry t of a CSR pattern, in fp32.

    Shapes: ``left`` [rows, T], ``right`` [T, cols], ``crow_indices`` [rows + 1],
    ``col_indices`` [k]; returns [k] in CSR (row-major sorted) order.
    The dense product is never formed.

    Example:
        >>> left, right = torch.randn(4, 8), torch.randn(8, 5)
        >>> crow, col = torch.tensor([0, 1, 1, 2, 2]), torch.tensor([3, 0])
        >>> out = sampled_dense_dense_matmul(left, right, crow, col)  # [(l@r)[0,3], (l@r)[2,0]]
    """
    rows, cols = left.shape[0], right.shape[1]
    num_entries = col_indices.numel()
    if num_entries == 0:
        return torch.zeros(0, dtype=torch.float32, device=left.device)
    # sampled_addmm accumulates in the input dtype: upcast so sums over tokens stay in fp32.
    pattern = torch.sparse_csr_tensor(
        crow_indices,
        col_indices,
        torch.zeros(num_entries, dtype=torch.float32, device=left.device),
        size=(rows, cols),
        check_invariants=False,
    )
    product = torch.sparse.sampled_addmm(pattern, left.float(), right.float(), beta=0.0)
    return product.values()
