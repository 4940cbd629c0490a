"""The sparse-delta layer on a bitsandbytes 4-bit (NF4/FP4) or 8-bit base: ``y = base(x) + x @ S^T``.

A quantized weight cannot hold the delta in place, so the layer always takes the additive path of
:class:`~peft_sparse.sparse.layer.SparseDeltaLayer`: S is the [out, in] matrix with ``values`` at the
sorted flat ``indices`` (a CSR pattern), applied by :func:`triton_kernels.sparse_delta_matmul` (CSR
matmul on CPU, Triton on CUDA), whose backward gives ``d values`` by SDDMM and ``d x`` by ``dY @ S``:
the base weight is never dequantized, in forward or in backward. Merging is refused (see
:func:`peft_sparse.quantization.merge_refusal`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quantization import keep_trainable_layout, merge_refusal, quantization_of
from .layer import SparseDeltaLinear


class QuantizedSparseDeltaLinear(SparseDeltaLinear):
    """Sparse-delta adapter around a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    Same state, state-dict names, selection steps and loading checks as :class:`SparseDeltaLinear`;
    the delta is always a separate sparse term.

    Example:
        >>> import bitsandbytes as bnb  # doctest: +SKIP
        >>> base = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")  # quantizes  # doctest: +SKIP
        >>> layer = QuantizedSparseDeltaLinear(base, "default", torch.tensor([3, 70, 900]))  # doctest: +SKIP
        >>> layer(torch.randn(2, 64)).shape  # doctest: +SKIP
        torch.Size([2, 32])
    """

    def _check_base_layer(self) -> None:
        base = self.get_base_layer()
        if quantization_of(base) is None:
            raise ValueError(
                f"QuantizedSparseDeltaLinear needs a bitsandbytes Linear4bit or Linear8bitLt base layer, got "
                f"{type(base).__name__}; use SparseDeltaLinear for dense layers"
            )
        keep_trainable_layout(base)

    def merge_refusal(self, adapter_names: list[str]) -> Optional[str]:
        return merge_refusal(self.get_base_layer(), adapter_names)

    def _base_output(self, x: torch.Tensor, in_weight: list[str], *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)  # bitsandbytes' own autograd; the weight is never written
