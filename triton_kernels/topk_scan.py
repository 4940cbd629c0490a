"""Top-k candidate scan: the largest ``|left @ right|`` entries outside an excluded set.

Shapes: ``left`` [rows, T], ``right`` [T, cols] (``left @ right`` is a dense weight gradient),
``exclude_indices`` [a] sorted unique flat positions; returns ``(indices [m] int64 sorted,
values [m] fp32)`` with ``m = min(count, rows * cols - a)``. Ties are broken arbitrarily.
"""

from __future__ import annotations

import torch

from ._dispatch import lazy_jit, tl, triton, use_triton

BLOCK_ROWS = 64
BLOCK_COLS = 64
BLOCK_TOKENS = 32
# |g| is bucketed by the top 15 bits of its fp32 pattern (8 exponent + 7 mantissa bits): buckets
# are ordered like the values and span < 1% relative each, so few extra entries pass the threshold.
BUCKET_SHIFT = 16
NUM_BUCKETS = 1 << (31 - BUCKET_SHIFT)


def topk_candidates_reference(
    left: torch.Tensor, right: torch.Tensor, exclude_indices: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`topk_candidates`: forms the dense product once."""
    gradient = (left.float() @ right.float()).view(-1)
    inactive = torch.ones(gradient.numel(), dtype=torch.bool, device=gradient.device)
    inactive[exclude_indices.long()] = False
    score = gradient.abs().masked_fill_(~inactive, -1.0)
    count = min(count, gradient.numel() - exclude_indices.numel())
    candidates = torch.topk(score, count, sorted=False).indices.sort().values
    return candidates, gradient[candidates]


@lazy_jit
def _scan_kernel(
    left_ptr, right_ptr, histogram_ptr, counter_ptr, positions_ptr, found_ptr, threshold_bucket,
    rows, cols, num_tokens,
    stride_left_row, stride_left_token, stride_right_token, stride_right_col,
    COLLECT: tl.constexpr, BUCKET_SHIFT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
):
    # One program per [BLOCK_ROWS, BLOCK_COLS] tile of the product, computed with tl.dot over token
    # tiles and then dropped. Pass 1 (COLLECT=False) histograms |g| by its bit pattern; pass 2 writes
    # the entries at or above the threshold bucket, compacted: one atomic per tile reserves the slots.
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    tokens = tl.arange(0, BLOCK_TOKENS)
    accumulator = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for token_start in range(0, num_tokens, BLOCK_TOKENS):
        token_ids = token_start + tokens
        left = tl.load(
            left_ptr + row_ids[:, None] * stride_left_row + token_ids[None, :] * stride_left_token,
            mask=(row_ids[:, None] < rows) & (token_ids[None, :] < num_tokens),
            other=0.0,
        )
        right = tl.load(
            right_ptr + token_ids[:, None] * stride_right_token + col_ids[None, :] * stride_right_col,
            mask=(token_ids[:, None] < num_tokens) & (col_ids[None, :] < cols),
            other=0.0,
        )
        # fp32 tiles: bf16/fp16 values are exact in TF32, so a TF32 dot equals a 16-bit dot with fp32
        # accumulation (at half the tensor-core rate); Triton's interpreter mis-multiplies bf16 in tl.dot.
        accumulator = tl.dot(left.to(tl.float32), right.to(tl.float32), accumulator, input_precision=INPUT_PRECISION)
    valid = (row_ids[:, None] < rows) & (col_ids[None, :] < cols)
    buckets = tl.abs(accumulator).to(tl.int32, bitcast=True) >> BUCKET_SHIFT
    if COLLECT:
        keep = tl.reshape((valid & (buckets >= threshold_bucket)).to(tl.int32), [BLOCK_ROWS * BLOCK_COLS])
        slot = tl.atomic_add(counter_ptr, tl.sum(keep)) + tl.cumsum(keep, axis=0) - keep
        positions = tl.reshape(row_ids[:, None] * cols + col_ids[None, :], [BLOCK_ROWS * BLOCK_COLS])
        tl.store(positions_ptr + slot, positions, mask=keep > 0)
        tl.store(found_ptr + slot, tl.reshape(accumulator, [BLOCK_ROWS * BLOCK_COLS]), mask=keep > 0)
    else:
        tl.atomic_add(histogram_ptr + buckets, 1, mask=valid)


def _scan_triton(
    left: torch.Tensor, right: torch.Tensor, exclude_indices: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    (rows, num_tokens), cols = left.shape, right.shape[1]
    device = left.device
    count = min(count, rows * cols - exclude_indices.numel())
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)
    # The top (count + excluded) entries overall contain the top `count` non-excluded ones, so the
    # kernel needs no exclusion test; excluded positions are dropped from the small survivor set.
    wanted = count + exclude_indices.numel()
    # fp32 inputs need IEEE products to match the reference; 16-bit inputs are exact in TF32
    precision = "ieee" if torch.float32 in (left.dtype, right.dtype) else "tf32"
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    histogram = torch.zeros(NUM_BUCKETS, dtype=torch.int32, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    common = dict(
        BUCKET_SHIFT=BUCKET_SHIFT, INPUT_PRECISION=precision,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, BLOCK_TOKENS=BLOCK_TOKENS,
    )
    strides = (*left.stride(), *right.stride())
    _scan_kernel[grid](
        left, right, histogram, counter, counter, counter, 0, rows, cols, num_tokens, *strides, COLLECT=False, **common
    )
    at_or_above = histogram.flip(0).cumsum(0).flip(0)  # entries in this bucket or a higher one
    threshold_bucket = int((at_or_above >= wanted).nonzero().max())
    survivors = int(at_or_above[threshold_bucket])
    positions = torch.empty(survivors, dtype=torch.int64, device=device)
    found = torch.empty(survivors, dtype=torch.float32, device=device)
    _scan_kernel[grid](
        left, right, histogram, counter, positions, found, threshold_bucket, rows, cols, num_tokens, *strides,
        COLLECT=True, **common,
    )
    if exclude_indices.numel():
        keep = ~torch.isin(positions, exclude_indices.long())
        positions, found = positions[keep], found[keep]
    best = torch.topk(found.abs(), count, sorted=False).indices
    order = positions[best].argsort()
    return positions[best][order], found[best][order]


def topk_candidates(
    left: torch.Tensor, right: torch.Tensor, exclude_indices: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` flat positions with the largest ``|left @ right|`` outside ``exclude_indices``, and their values.

    On CUDA (Triton) the product is computed tile by tile and never stored: memory is
    O(count + excluded) instead of O(rows * cols).

    Example:
        >>> left, right = torch.randn(6, 16), torch.randn(16, 5)
        >>> indices, values = topk_candidates(left, right, torch.tensor([0, 7]), count=4)
        >>> indices.shape, values.dtype
        (torch.Size([4]), torch.float32)
    """
    if use_triton(left, right, exclude_indices):
        return _scan_triton(left, right, exclude_indices, count)
    return topk_candidates_reference(left, right, exclude_indices, count)
