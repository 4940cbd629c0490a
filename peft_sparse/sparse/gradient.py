"""Linear forward through a weight that may hold sparse deltas, and a sparse gradient for those deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from triton_kernels import sampled_dense_dense_matmul

from .write_guard import GraphHolds

# Called in backward with (left [rows, T], right [T, cols]) whose product is the dense weight gradient.
GradientObserver = Callable[[torch.Tensor, torch.Tensor], None]


class GradientBinding(Protocol):
    """How backward computes one adapter's gradients from the factors of the stored weight's gradient."""

    observer: Optional[GradientObserver]

    def gradient(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gradients of the adapter's trainable tensors, in order, from ``left [rows, T] @ right [T, cols]``."""


@dataclass
class SparseDeltaBinding:
    """What backward needs per adapter: the CSR pattern of its indices and an optional statistics observer."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    observer: Optional[GradientObserver] = None

    def gradient(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor]:
        """``(d values [k],)``: the entries of ``left @ right`` at the pattern (SDDMM)."""
        return (sampled_dense_dense_matmul(left, right, self.crow_indices, self.col_indices),)


class MergedSparseDeltaLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` where W holds ``W0 + delta``; backward gives each binding's gradients.

    ``weight_is_transposed`` is True for transformers' ``Conv1D`` (weight stored [in, out]).
    ``tensors`` are the bindings' trainable tensors, concatenated in binding order. Each binding
    computes its own gradients from the weight gradient's factors (SDDMM for a sparse set, a dense
    GEMM for a slice, the kernel chain rule for SNELL); the dense weight gradient is never formed
    whole, except inside an observer on selection steps.
    With no bindings it is a plain linear whose graph is counted in ``holds``: while the graph
    lives, the layer does not write the weight (see :mod:`.write_guard`).
    """

    @staticmethod
    def forward(ctx, inputs, weight, bias, weight_is_transposed, holds: GraphHolds, bindings, *tensors):
        ctx.weight_is_transposed = weight_is_transposed
        ctx.bindings = bindings
        ctx.bias_requires_grad = bias is not None and bias.requires_grad
        ctx.tensor_dtypes = [tensor.dtype for tensor in tensors]
        ctx.save_for_backward(inputs, weight)
        if any(ctx.needs_input_grad):  # a graph keeps this ctx, and with it the saved weight
            ctx.weight_hold = holds.hold()
        matrix = weight.t() if weight_is_transposed else weight
        output = F.linear(inputs, matrix, bias)
        ctx.compute_dtype = output.dtype  # differs from the weight's under autocast
        return output

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        matrix = weight.t() if ctx.weight_is_transposed else weight  # [out, in]
        grad_inputs = None
        if ctx.needs_input_grad[0]:
            compute_dtype = ctx.compute_dtype
            grad_inputs = (grad_output.to(compute_dtype) @ matrix.to(compute_dtype)).to(inputs.dtype)
        grad_output_2d = grad_output.reshape(-1, grad_output.shape[-1])  # [T, out]
        grad_bias = grad_output_2d.sum(0) if ctx.bias_requires_grad else None
        inputs_2d = inputs.reshape(-1, inputs.shape[-1])  # [T, in]
        # the stored weight's gradient is left @ right: [out, in] for Linear, [in, out] for Conv1D
        if ctx.weight_is_transposed:
            left, right = inputs_2d.t(), grad_output_2d
        else:
            left, right = grad_output_2d.t(), inputs_2d
        grads = []
        for binding in ctx.bindings:
            grads.extend(binding.gradient(left, right))
            if binding.observer is not None:
                binding.observer(left, right)
        ctx.weight_hold.release()
        grads = [grad.to(dtype) for grad, dtype in zip(grads, ctx.tensor_dtypes, strict=True)]
        return (grad_inputs, None, grad_bias, None, None, None, *grads)


def observe_weight_gradient(
    observer: GradientObserver,
    inputs: torch.Tensor,
    weight_is_transposed: bool,
    grad_output: torch.Tensor,
) -> None:
    """Hand ``observer`` the factors of the stored weight's gradient (a tensor hook on a sparse term's output)."""
    inputs_2d = inputs.reshape(-1, inputs.shape[-1])  # [T, in]
    grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # [T, out]
    if weight_is_transposed:
        observer(inputs_2d.t(), grad_2d)
    else:
        observer(grad_2d.t(), inputs_2d)
