"""The compact layout of a sparse-delta adapter file (format_version 2): index gaps in small unsigned integers.

A layer's sorted flat indices ``i_0 < i_1 < ...`` are saved as gaps ``g_0 = i_0``,
``g_j = i_j - i_(j-1) - 1`` (so neighbours cost 0), each written as ``g // M`` escape symbols ``M``
followed by ``g % M``, in the unsigned dtype (uint8, uint16 or uint32; ``M`` its largest value) that
gives the fewest bytes for that layer. At density ``d`` a gap takes about one symbol when
``1 / d`` is well under ``M``: at 1% random indices cost 1.08 bytes each with uint8 (the information
limit is ``log2(e / d)`` bits, 1.01 bytes), against 4 for int32 in format 1. The values need no
reordering: a layer keeps its indices sorted, and values are stored in index order in both formats.

Format 1 saved ``<module>.sparse_indices`` (int32/int64); format 2 saves
``<module>.sparse_index_gaps`` instead (likewise ``lift_``, ``s2ft_``). A state dict names its own
layout, so both load.
"""

from __future__ import annotations

import torch

from .indices import check_index_set

GAP_DTYPES = (torch.uint8, torch.uint16, torch.uint32)
GAPS_SUFFIX = "index_gaps"
INDICES_SUFFIX = "indices"


def _escape_symbol(dtype: torch.dtype) -> int:
    return 2 ** (8 * dtype.itemsize) - 1


def gaps_name(indices_name: str) -> str:
    """The format-2 tensor name for the format-1 ``indices_name``: ``sparse_indices`` -> ``sparse_index_gaps``."""
    return indices_name.removesuffix(INDICES_SUFFIX) + GAPS_SUFFIX


def indices_name(gaps_name: str) -> str:
    """Inverse of :func:`gaps_name`: ``lift_index_gaps`` -> ``lift_indices``."""
    return gaps_name.removesuffix(GAPS_SUFFIX) + INDICES_SUFFIX


def encode_indices(indices: torch.Tensor) -> torch.Tensor:
    """Sorted distinct flat ``indices`` [k] as an escape-coded gap stream [>= k] of uint8, uint16 or uint32.

    Example:
        >>> encode_indices(torch.tensor([0, 3, 4, 300]))
        tensor([  0,   2,   0, 255,  40], dtype=torch.uint8)
    """
    check_index_set(indices, num_entries=2**63 - 1, where="encode_indices")
    indices = indices.detach().cpu().long()
    gaps = torch.diff(indices, prepend=indices.new_full((1,), -1)) - 1  # [k], >= 0
    dtype = min(GAP_DTYPES, key=lambda dtype: dtype.itemsize * int((gaps // _escape_symbol(dtype) + 1).sum()))
    escape = _escape_symbol(dtype)
    symbols_per_gap = gaps // escape + 1
    stream = torch.full((int(symbols_per_gap.sum()),), escape, dtype=torch.int64)
    stream[torch.cumsum(symbols_per_gap, 0) - 1] = gaps % escape
    return stream.to(dtype)


def decode_indices(stream: torch.Tensor, where: str = "index gaps") -> torch.Tensor:
    """The int64 flat indices [k] that :func:`encode_indices` wrote as ``stream``; ValueError on a malformed stream.

    Example:
        >>> decode_indices(torch.tensor([0, 2, 0, 255, 40], dtype=torch.uint8))
        tensor([  0,   3,   4, 300])
    """
    if stream.dtype not in GAP_DTYPES or stream.dim() != 1:
        raise ValueError(
            f"{where}: index gaps must be a 1-D tensor of uint8, uint16 or uint32, got a {stream.dim()}-D "
            f"{stream.dtype} tensor; the adapter file is damaged or was not written by peft_sparse"
        )
    escape = _escape_symbol(stream.dtype)
    symbols = stream.cpu().to(torch.int64)
    if symbols.numel() and int(symbols[-1]) == escape:
        raise ValueError(f"{where}: index gaps end inside a gap; the adapter file is damaged (truncated or edited)")
    ends = torch.nonzero(symbols != escape).squeeze(1)  # [k]: the last symbol of each gap
    return torch.cumsum(symbols, 0)[ends] + torch.arange(ends.numel())


def compact_tensors(
    tensors: dict[str, torch.Tensor], values_name: str, indices_name: str, save_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Format-1 adapter tensors -> format 2: ``...<indices_name>...`` keys become gap streams, values ``save_dtype``.

    Keys may carry a suffix after the attribute (the adapter name, ``...sparse_indices.default``).
    """
    compact = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if indices_name in parts:
            position = len(parts) - 1 - parts[::-1].index(indices_name)
            parts[position] = gaps_name(indices_name)
            compact[".".join(parts)] = encode_indices(tensor)
        elif values_name in parts and save_dtype is not None:
            compact[key] = tensor.detach().to(save_dtype)
        else:
            compact[key] = tensor
    return compact


def expand_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors of either format -> format 1: every ``<module>.<p>index_gaps`` key decoded to ``<p>indices``.

    Example:
        >>> expand_tensors({"fc.sparse_index_gaps": torch.tensor([2, 0], dtype=torch.uint8)})
        {'fc.sparse_indices': tensor([2, 3])}
    """
    expanded = {}
    for key, tensor in tensors.items():
        module, _, attribute = key.rpartition(".")
        if attribute.endswith(GAPS_SUFFIX):
            expanded[f"{module}.{indices_name(attribute)}"] = decode_indices(tensor, where=f"'{key}'")
        else:
            expanded[key] = tensor
    return expanded
