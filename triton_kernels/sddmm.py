"""Sampled dense-dense matmul (SDDMM): entries of ``left @ right`` at a CSR pattern, in fp32.

Shapes: ``left`` [rows, T], ``right`` [T, cols], ``crow_indices`` [rows + 1], ``col_indices``
[k]; the result is [k] fp32 in CSR (row-major sorted) order. The dense product is never formed.
"""

from __future__ import annotations

import warnings

import torch

from ._dispatch import lazy_jit, tl, triton, use_triton

# torch warns once that CSR support is "beta"; we rely only on sampled_addmm, tested here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

BLOCK_ENTRIES = 32
BLOCK_TOKENS = 128


def sampled_dense_dense_matmul_reference(
    left: torch.Tensor, right: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`sampled_dense_dense_matmul` (``torch.sparse.sampled_addmm``)."""
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
    with torch.autocast(device_type=left.device.type, enabled=False):  # keep the fp32 sums under autocast
        product = torch.sparse.sampled_addmm(pattern, left.float(), right.float(), beta=0.0)
    return product.values()


@lazy_jit
def _sddmm_kernel(
    left_ptr, right_t_ptr, entry_rows_ptr, entry_cols_ptr, out_ptr, num_entries, num_tokens,
    stride_left_row, stride_right_col,
    BLOCK_ENTRIES: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
):
    # One program per BLOCK_ENTRIES consecutive CSR entries (balanced however rows are filled),
    # looping over token tiles. Both operands are token-contiguous ([rows, T] and [cols, T]), so each
    # entry reads two contiguous runs of BLOCK_TOKENS values: full memory transactions, where the
    # [T, cols] layout would fetch a whole sector per scattered element. Consecutive entries mostly
    # share a row, so the left rows are served from cache; the cost is ~2 * k * T reads from L2.
    entries = tl.program_id(0).to(tl.int64) * BLOCK_ENTRIES + tl.arange(0, BLOCK_ENTRIES)
    in_range = entries < num_entries
    rows = tl.load(entry_rows_ptr + entries, mask=in_range, other=0).to(tl.int64)
    cols = tl.load(entry_cols_ptr + entries, mask=in_range, other=0).to(tl.int64)
    tokens = tl.arange(0, BLOCK_TOKENS)
    accumulator = tl.zeros((BLOCK_ENTRIES,), dtype=tl.float32)
    for token_start in range(0, num_tokens, BLOCK_TOKENS):
        token_ids = token_start + tokens
        mask = in_range[:, None] & (token_ids[None, :] < num_tokens)
        left = tl.load(left_ptr + rows[:, None] * stride_left_row + token_ids[None, :], mask=mask, other=0.0)
        right = tl.load(right_t_ptr + cols[:, None] * stride_right_col + token_ids[None, :], mask=mask, other=0.0)
        accumulator += tl.sum(left.to(tl.float32) * right.to(tl.float32), axis=1)
    tl.store(out_ptr + entries, accumulator, mask=in_range)


def entry_rows(crow_indices: torch.Tensor, num_entries: int) -> torch.Tensor:
    """Row of every CSR entry, [k] int64 (``output_size`` avoids a device sync)."""
    rows = torch.arange(crow_indices.numel() - 1, device=crow_indices.device)
    return torch.repeat_interleave(rows, crow_indices.diff().long(), output_size=num_entries)


def _sddmm_triton(
    left: torch.Tensor, right: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    num_entries, num_tokens = col_indices.numel(), left.shape[1]
    output = torch.empty(num_entries, dtype=torch.float32, device=left.device)
    if num_entries == 0:
        return output
    # token-contiguous copies cost T * (rows + cols) element moves, far below the ~2 * k * T gathered reads
    left_rows = left.contiguous()  # [rows, T]
    right_cols = right.t().contiguous()  # [cols, T]
    grid = (triton.cdiv(num_entries, BLOCK_ENTRIES),)
    _sddmm_kernel[grid](
        left_rows, right_cols, entry_rows(crow_indices, num_entries), col_indices.contiguous(), output,
        num_entries, num_tokens, left_rows.stride(0), right_cols.stride(0),
        BLOCK_ENTRIES=BLOCK_ENTRIES, BLOCK_TOKENS=BLOCK_TOKENS,
    )
    return output


def sampled_dense_dense_matmul(
    left: torch.Tensor, right: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """Return ``(left @ right)[row_t, col_t]`` for every entry t of a CSR pattern, in fp32 (Triton on CUDA).

    Example:
        >>> left, right = torch.randn(4, 8), torch.randn(8, 5)
        >>> crow, col = torch.tensor([0, 1, 1, 2, 2]), torch.tensor([3, 0])
        >>> out = sampled_dense_dense_matmul(left, right, crow, col)  # [(l@r)[0,3], (l@r)[2,0]]
    """
    if use_triton(left, right, crow_indices, col_indices):
        return _sddmm_triton(left, right, crow_indices, col_indices)
    return sampled_dense_dense_matmul_reference(left, right, crow_indices, col_indices)
