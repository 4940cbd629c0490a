"""Flat index sets over a weight matrix: dtype choice, sampling, CSR patterns."""

from __future__ import annotations

import zlib
from typing import Optional

import torch

INT32_LIMIT = 2**31


def index_dtype_for(num_entries: int) -> torch.dtype:
    """int32 when every flat index of a matrix with ``num_entries`` entries fits, else int64."""
    return torch.int32 if num_entries < INT32_LIMIT else torch.int64


def layer_seed(init_seed: int, module_name: str) -> int:
    """A per-layer seed that depends only on the config seed and the module's name (not on visiting order)."""
    return (init_seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63)


def random_unique_indices(num_entries: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct flat indices drawn uniformly from ``range(num_entries)``, sorted ascending.

    Uses rejection sampling, so memory is O(count) even for matrices with
    billions of entries (``torch.randperm(num_entries)`` would be O(num_entries)).

    Example:
        >>> random_unique_indices(100, 5, seed=0).tolist()  # doctest: +SKIP
        [12, 40, 41, 77, 93]
    """
    if not 0 <= count <= num_entries:
        raise ValueError(f"count must be in [0, {num_entries}], got {count}")
    generator = torch.Generator().manual_seed(seed)
    dtype = index_dtype_for(num_entries)
    if 2 * count > num_entries:
        return torch.randperm(num_entries, generator=generator)[:count].sort().values.to(dtype)
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < count:
        draw = torch.randint(0, num_entries, (2 * (count - chosen.numel()) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    # unique() sorts, so trimming the tail would bias towards small indices: subsample at random instead.
    keep = torch.randperm(chosen.numel(), generator=generator)[:count]
    return chosen[keep].sort().values.to(dtype)


def csr_pattern(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(crow_indices [rows + 1], col_indices [k])`` of sorted flat ``indices`` in a ``shape`` matrix.

    Both outputs have the dtype of ``indices`` (sampled_addmm wants them equal).
    """
    rows, cols = shape
    row_of_entry = torch.div(indices, cols, rounding_mode="floor").long()
    counts = torch.bincount(row_of_entry, minlength=rows)
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(indices.dtype), (indices % cols).to(indices.dtype)


def check_index_set(indices: torch.Tensor, num_entries: int, where: str) -> None:
    """Raise ValueError unless ``indices`` is a strictly increasing integer set inside ``[0, num_entries)``."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: indices must be int32 or int64, got {indices.dtype}")
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= num_entries:
        raise ValueError(
            f"{where}: indices must be in [0, {num_entries}), got range "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{where}: indices must be sorted ascending without duplicates")


def output_major_pattern(
    indices: torch.Tensor, shape: tuple[int, int], weight_is_transposed: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """CSR of the delta as an [out, in] matrix S, for ``x @ S^T``: ``(crow [out + 1], col [k], permutation)``.

    ``indices`` address the weight as stored (``shape``); for a Conv1D weight, stored [in, out], the
    entries are reordered and ``values[permutation]`` lines them up with the pattern (else None).
    """
    if not weight_is_transposed:
        crow, col = csr_pattern(indices, shape)
        return crow, col, None
    in_features, out_features = shape
    as_output_major = (indices % out_features).long() * in_features + torch.div(
        indices, out_features, rounding_mode="floor"
    ).long()
    permutation = torch.argsort(as_output_major)
    crow, col = csr_pattern(as_output_major[permutation].to(indices.dtype), (out_features, in_features))
    return crow, col, permutation
