"""The sparse-delta layer on a bitsandbytes 4-bit (NF4/FP4) or 8-bit base: ``y = base(x) + x @ S^T``.

A quantized weight cannot hold the delta in place, so the layer always takes the additive path of
:class:`~peft_sparse.sparse.layer.SparseDeltaLayer`: S is the [out, in] matrix with ``values`` at the
sorted flat ``indices`` (a CSR pattern), applied by :func:`triton_kernels.sparse_delta_matmul` (CSR
matmul on CPU, Triton on CUDA), whose backward gives ``d values`` by SDDMM and ``d x`` by ``dY @ S``:
the base weight is never dequantized, in forward or in backward. Merging is refused (see
:func:`peft_sparse.quantization.merge_refusal`).
"""

from __future__ import annotations

from ..quantization import keep_trainable_layout, quantization_of
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
