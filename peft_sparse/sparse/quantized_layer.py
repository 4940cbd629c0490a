"""The sparse-delta layer on a bitsandbytes 4-bit (NF4/FP4) or 8-bit base: ``y = base(x) + x @ S^T``.

A quantized weight cannot hold the delta in place, so the delta is a separate sparse term, S the
[out, in] matrix with ``values`` at the sorted flat ``indices`` (a CSR pattern). The term goes through
:func:`triton_kernels.sparse_delta_matmul` (CSR matmul on CPU, Triton on CUDA), whose backward gives
``d values`` by SDDMM and ``d x`` by ``dY @ S``: the base weight is never dequantized, in forward or
in backward, and no dense copy of it is kept. Merging is refused (see
:func:`peft_sparse.quantization.check_merge_supported`).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from triton_kernels import sparse_delta_matmul

from ..quantization import check_merge_supported, keep_trainable_layout, quantization_of
from .gradient import GradientObserver
from .layer import SparseDeltaLayer


def _observe_gradient(
    observer: GradientObserver, inputs: torch.Tensor, grad_output: torch.Tensor, out_features: int
) -> None:
    # the layer's weight gradient is grad_output^T @ inputs: [out, T] @ [T, in]
    observer(grad_output.reshape(-1, out_features).t(), inputs.reshape(-1, inputs.shape[-1]))


class QuantizedSparseDeltaLinear(nn.Module, SparseDeltaLayer):
    """Sparse-delta adapter around a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    Same state, state-dict names, selection steps and loading checks as :class:`SparseDeltaLinear`;
    only the way the delta is applied differs.

    Example:
        >>> import bitsandbytes as bnb  # doctest: +SKIP
        >>> base = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")  # quantizes  # doctest: +SKIP
        >>> layer = QuantizedSparseDeltaLinear(base, "default", torch.tensor([3, 70, 900]))  # doctest: +SKIP
        >>> layer(torch.randn(2, 64)).shape  # doctest: +SKIP
        torch.Size([2, 32])
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, indices: torch.Tensor) -> None:
        super().__init__()
        SparseDeltaLayer.__init__(self, base_layer)
        if quantization_of(self.get_base_layer()) is None:
            raise ValueError(
                f"QuantizedSparseDeltaLinear needs a bitsandbytes Linear4bit or Linear8bitLt base layer, got "
                f"{type(self.get_base_layer()).__name__}; use SparseDeltaLinear for dense layers"
            )
        keep_trainable_layout(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Always raises ValueError (for a non-empty merge): a quantized weight cannot take the delta exactly."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.delta_values]
        check_merge_supported(self.get_base_layer(), adapter_names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out_features = self.weight_shape[0]
        for name in self.active_adapters:
            if name not in self.delta_values:
                continue
            pattern = self._pattern(name)
            values = self.delta_values[name]
            # x keeps its dtype (bf16 inputs stay bf16 in memory); the kernel sums in fp32
            term = sparse_delta_matmul(x, values, pattern.crow_indices, pattern.col_indices, out_features)
            observer = self.gradient_observers.get(name)
            if observer is not None and term.requires_grad:
                term.register_hook(partial(_observe_gradient, observer, x.detach(), out_features=out_features))
            result = result + term.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()
