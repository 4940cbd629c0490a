"""S2FT's layer: the shared sparse-delta layer whose index set is a slice of whole rows or whole columns.

A slice of the stored weight [rows, cols] is a set of flat indices, so S2FT reuses the in-place
machinery of :class:`~peft_sparse.sparse.layer.SparseDeltaLayer` (free forward, ``W0`` in state
dicts, additive path on held, tied, quantized or sharded weights). Its ``values`` [k] in flat order
are the slice itself, row-major: [rows, n] for n selected columns, [n, cols] for n selected rows.
What differs is the gradient: the slice of ``left @ right`` is a dense GEMM on the selected
columns of ``right`` (or rows of ``left``), not an SDDMM. The selected positions are gathered with
``index_select`` rather than co-permuting the model to make them contiguous: the gather costs
0.3 ms next to the 4-6 ms of the GEMM it feeds (576x1536 ``down_proj``, 219 channels, 512 tokens,
one CPU thread), and a permuted model would no longer be the base model outside the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...sparse.gradient import GradientObserver
from ...sparse.indices import index_dtype_for
from ...sparse.layer import SparseDeltaLinear
from ...sparse.quantized_layer import QuantizedSparseDeltaLinear

ROWS, COLUMNS = 0, 1  # the axis of the stored weight a slice selects along


@dataclass(frozen=True)
class WeightSlice:
    """Whole rows (``axis=ROWS``) or whole columns (``axis=COLUMNS``) of a stored weight, at sorted ``positions`` [n]."""

    axis: int
    positions: torch.Tensor


def slice_indices(axis: int, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sorted flat indices [n * cols] or [rows * n] of the slice at sorted ``positions`` of a ``shape`` weight.

    Example:
        >>> slice_indices(COLUMNS, torch.tensor([0, 2]), (2, 3)).tolist()
        [0, 2, 3, 5]
    """
    rows, cols = shape
    positions = positions.long()
    if axis == ROWS:
        flat = positions[:, None] * cols + torch.arange(cols, device=positions.device)[None, :]
    else:
        flat = torch.arange(rows, device=positions.device)[:, None] * cols + positions[None, :]
    return flat.flatten().to(index_dtype_for(rows * cols))


def slice_of(indices: torch.Tensor, shape: tuple[int, int], where: str) -> WeightSlice:
    """The row or column slice whose flat indices are ``indices``; ValueError if they are none.

    A set that is both (the whole matrix) is read as columns; either reading gives the same delta.
    """
    rows, cols = shape
    count = indices.numel()
    if count and count % rows == 0:
        columns = indices[: count // rows].long()
        if int(columns[-1]) < cols and torch.equal(slice_indices(COLUMNS, columns, shape).to(indices), indices):
            return WeightSlice(COLUMNS, columns)
    if count and count % cols == 0:
        row_positions = indices[::cols].long() // cols
        if torch.equal(slice_indices(ROWS, row_positions, shape).to(indices), indices):
            return WeightSlice(ROWS, row_positions)
    raise ValueError(
        f"{where}: S2FT indices must be whole rows or whole columns of the {rows}x{cols} weight, got {count} "
        "indices that are neither"
    )


@dataclass
class SliceBinding:
    """Backward's ``d values`` for a slice: the selected rows/columns of ``left @ right`` [rows, cols] by one GEMM."""

    weight_slice: WeightSlice
    observer: Optional[GradientObserver] = None

    def gradient(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor]:
        # left [rows, T], right [T, cols]; row-major order of the slice is the flat order of its indices
        positions = self.weight_slice.positions.to(left.device)
        if self.weight_slice.axis == COLUMNS:
            return ((left @ right.index_select(1, positions)).reshape(-1),)  # [rows * n]
        return ((left.index_select(0, positions) @ right).reshape(-1),)  # [n * cols]


class SliceDelta:
    """What S2FT changes in the sparse-delta layer: slice-shaped indices, GEMM gradient, dense additive term."""

    def _slices(self) -> dict[str, tuple[torch.Tensor, int, WeightSlice]]:
        if "_slice_cache" not in self.__dict__:
            self._slice_cache = {}
        return self._slice_cache

    def weight_slice(self, adapter_name: str) -> WeightSlice:
        """The slice adapter ``adapter_name`` trains (recomputed when its indices change, e.g. on load)."""
        indices = self.delta_indices[adapter_name]
        cached = self._slices().get(adapter_name)
        if cached is None or cached[0] is not indices or cached[1] != indices._version:
            cached = (indices, indices._version, slice_of(indices, self.weight_shape, f"adapter '{adapter_name}'"))
            self._slices()[adapter_name] = cached
        return cached[2]

    def update_layer(self, adapter_name: str, indices: torch.Tensor, *args, **kwargs) -> None:
        slice_of(indices, self.weight_shape, f"adapter '{adapter_name}'")
        super().update_layer(adapter_name, indices, *args, **kwargs)

    def _gradient_binding(self, adapter_name: str) -> SliceBinding:
        return SliceBinding(self.weight_slice(adapter_name))

    def logical_slice(self, adapter_name: str) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """``(selects_inputs, positions [n], delta)`` of the slice in the [out, in] orientation of ``F.linear``.

        ``selects_inputs``: the slice is input columns and ``delta`` is [out, n]; else output rows and
        ``delta`` is [n, in]. ``delta`` is a view of the trainable values (differentiable).
        """
        weight_slice = self.weight_slice(adapter_name)
        values = self.delta_values[adapter_name]
        rows, cols = self.weight_shape
        count = weight_slice.positions.numel()
        stored = values.view(rows, count) if weight_slice.axis == COLUMNS else values.view(count, cols)
        # a Linear weight is stored [out, in], a Conv1D weight [in, out]
        selects_inputs = (weight_slice.axis == COLUMNS) != self.weight_is_transposed
        return selects_inputs, weight_slice.positions, stored.t() if self.weight_is_transposed else stored

    def _delta_term(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x @ S^T`` for the slice ``S`` as a small dense product (on held, tied, quantized weights)."""
        selects_inputs, positions, delta = self.logical_slice(adapter_name)
        positions = positions.to(x.device)
        if selects_inputs:
            return x.index_select(-1, positions).to(delta.dtype) @ delta.t()  # [.., n] @ [n, out]
        partial = x.to(delta.dtype) @ delta.t()  # [.., in] @ [in, n]
        return partial.new_zeros(*partial.shape[:-1], self.out_features).index_add(-1, positions, partial)

    def delete_adapter(self, adapter_name: str) -> None:
        self._slices().pop(adapter_name, None)
        super().delete_adapter(adapter_name)


class S2ftLinear(SliceDelta, SparseDeltaLinear):
    """S2FT adapter around an ``nn.Linear`` or transformers ``Conv1D``: one trainable slice per adapter.

    Example:
        >>> from torch import nn
        >>> indices = slice_indices(COLUMNS, torch.tensor([1, 5]), (4, 8))  # columns 1 and 5 of a [4, 8] weight
        >>> layer = S2ftLinear(nn.Linear(8, 4), "default", indices)
        >>> layer.s2ft_values["default"].view(4, 2).shape, layer(torch.randn(2, 8)).shape
        (torch.Size([4, 2]), torch.Size([2, 4]))
    """

    adapter_layer_names = ("s2ft_values",)
    other_param_names = ("s2ft_indices",)

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__().removeprefix("sparse.")


class QuantizedS2ftLinear(SliceDelta, QuantizedSparseDeltaLinear):
    """S2FT on a bitsandbytes 4-bit/8-bit base: the slice is always a separate dense term."""

    adapter_layer_names = ("s2ft_values",)
    other_param_names = ("s2ft_indices",)
