"""Sparse merge: write ``base_values + scale * values`` (or add ``scale * values``) into a dense weight at flat indices.

Shapes everywhere: ``weight`` contiguous, any shape, N entries; ``indices`` [k] int32 or
int64, unique; ``base_values`` [k] in the weight's dtype; ``values`` [k] any float dtype.
Sums are taken in fp32 and rounded once to the weight's dtype.
"""

from __future__ import annotations

import torch

from ._dispatch import lazy_jit, tl, triton, use_triton

# One entry per lane: the op is a gather/scatter of k scattered words, so only occupancy matters.
BLOCK_ENTRIES = 1024


@torch.no_grad()
def scatter_assign_reference(
    weight: torch.Tensor, indices: torch.Tensor, base_values: torch.Tensor, values: torch.Tensor, scale: float = 1.0
) -> None:
    """Torch reference of :func:`scatter_assign`."""
    if indices.numel() == 0:
        return
    merged = torch.add(base_values.float(), values.float(), alpha=scale).to(weight.dtype)
    # index_copy_ on the flat view writes k words; it wants int64 indices (int32 is rejected)
    weight.view(-1).index_copy_(0, indices.long(), merged)


@torch.no_grad()
def scatter_add_reference(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> None:
    """Torch reference of :func:`scatter_add`."""
    if indices.numel() == 0:
        return
    flat, positions = weight.view(-1), indices.long()
    merged = torch.add(flat[positions].float(), values.float(), alpha=scale).to(weight.dtype)
    flat.index_copy_(0, positions, merged)


@lazy_jit
def _scatter_kernel(
    weight_ptr, indices_ptr, base_ptr, values_ptr, num_entries, scale,
    ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_entries
    positions = tl.load(indices_ptr + offsets, mask=in_range, other=0).to(tl.int64)
    values = tl.load(values_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    if ACCUMULATE:
        base = tl.load(weight_ptr + positions, mask=in_range, other=0.0).to(tl.float32)
    else:
        base = tl.load(base_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    merged = base + scale * values
    tl.store(weight_ptr + positions, merged.to(weight_ptr.dtype.element_ty), mask=in_range)


def _scatter_triton(
    weight: torch.Tensor, indices: torch.Tensor, base_values: torch.Tensor | None, values: torch.Tensor, scale: float
) -> None:
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous, got strides {tuple(weight.stride())}")
    num_entries = indices.numel()
    if num_entries == 0:
        return
    accumulate = base_values is None
    grid = (triton.cdiv(num_entries, BLOCK_ENTRIES),)
    _scatter_kernel[grid](
        weight, indices.contiguous(), values if accumulate else base_values.contiguous(), values.contiguous(),
        num_entries, float(scale), ACCUMULATE=accumulate, BLOCK=BLOCK_ENTRIES,
    )


@torch.no_grad()
def scatter_assign(
    weight: torch.Tensor, indices: torch.Tensor, base_values: torch.Tensor, values: torch.Tensor, scale: float = 1.0
) -> None:
    """Set ``weight.view(-1)[indices] = base_values + scale * values`` in place (Triton on CUDA).

    Example:
        >>> w = torch.zeros(2, 3)
        >>> scatter_assign(w, torch.tensor([1, 5]), torch.zeros(2), torch.tensor([1.0, 2.0]))
        >>> w.view(-1).tolist()
        [0.0, 1.0, 0.0, 0.0, 0.0, 2.0]
    """
    if use_triton(weight, indices, base_values, values):
        _scatter_triton(weight, indices, base_values, values, scale)
    else:
        scatter_assign_reference(weight, indices, base_values, values, scale)


@torch.no_grad()
def scatter_add(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> None:
    """Add ``scale * values`` to ``weight.view(-1)[indices]`` in place (indices unique; Triton on CUDA).

    Example:
        >>> w = torch.ones(2, 2)
        >>> scatter_add(w, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1.0, 2.0]), scale=0.5)
        >>> w.view(-1).tolist()
        [1.5, 1.0, 1.0, 2.0]
    """
    if use_triton(weight, indices, values):
        _scatter_triton(weight, indices, None, values, scale)
    else:
        scatter_add_reference(weight, indices, values, scale)
