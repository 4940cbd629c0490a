"""SNELL matmul: ``x @ E^T`` where ``E`` is a thresholded kernel matrix of two low-rank factors.

``K[j, i] = sum_h c_h * kappa(a_i^h, b_j^h)`` for input factors ``A`` [H, in, d] and output factors
``B`` [H, out, d]; ``E = K`` (or ``K * |K|`` with magnitude competition) where ``|K| >= tau``, else 0.
Kernels: ``"linear"`` (``kappa = <a, b>``, ``c_h = scale``: LoRA's ``B @ A^T``), ``"distance_diff"``
(``kappa = ||a - b||_2``) and ``"rbf"`` (``kappa = exp(-gamma ||a - b||^2)``), the last two with
``c_h = scale * (-1)^h``. ``tau`` gets no gradient; the magnitude factor ``|K|`` is detached.

Neither path keeps ``E`` [out, in] for backward: both save only ``x``, ``A``, ``B`` and ``tau`` and
recompute the kernel there. The torch reference (CPU) forms ``E`` transiently, one layer at a time;
the Triton kernels (CUDA) compute kernel tiles in registers and never write ``E`` to memory:
forward ``y = x @ E^T``, backward ``dx = dy @ E`` and ``dA, dB`` from the tiles of ``dy^T @ x``
(accumulated with fp32 atomics, so their summation order is not deterministic).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ._dispatch import interpreter_requested, lazy_jit, tl, triton, use_triton

if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

KERNELS = ("linear", "distance_diff", "rbf")


class KernelSpec(NamedTuple):
    """Which kernel and its constants; ``magnitude`` multiplies kept entries by their detached ``|K|``."""

    name: str
    scale: float
    gamma: float = 1.0
    magnitude: bool = False


def _coefficient(spec: KernelSpec, group: int) -> float:
    return spec.scale if spec.name == "linear" or group % 2 == 0 else -spec.scale


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 for fp64 inputs."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` [out, in] for ``a`` [in, d], ``b`` [out, d], at least in fp32, clamped at 0.

    One GEMM over augmented rows, ``[b_j, ||b_j||^2, 1] . [-2 a_i, 1, ||a_i||^2]``, so the [out, in]
    result is written once (no broadcast passes for the norms).
    """
    a, b = _upcast(a), _upcast(b)
    left = torch.cat([b, (b * b).sum(1, keepdim=True), torch.ones_like(b[:, :1])], 1)
    right = torch.cat([-2 * a, torch.ones_like(a[:, :1]), (a * a).sum(1, keepdim=True)], 1)
    return (left @ right.T).clamp_min_(0)


def _group_kappa(a: torch.Tensor, b: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """``kappa(a_i, b_j)`` [out, in] of one group of a distance kernel, without its coefficient."""
    squared = _squared_distances(a, b)
    return squared.sqrt_() if spec.name == "distance_diff" else squared.mul_(-spec.gamma).exp_()


def _kernel_and_group_values(
    input_factors: torch.Tensor, output_factors: torch.Tensor, spec: KernelSpec, keep_groups: bool = False
) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
    """``K`` [out, in] and, if ``keep_groups`` (distance kernels), each group's ``kappa`` values for backward."""
    with torch.no_grad():
        if spec.name == "linear":
            return spec.scale * torch.einsum("hod,hid->oi", _upcast(output_factors), _upcast(input_factors)), None
        kernel, groups = None, []
        for group in range(input_factors.shape[0]):  # sum_h (-1)^h kappa_h, then times the scale:
            values = _group_kappa(input_factors[group], output_factors[group], spec)  # equal groups cancel exactly
            if kernel is None:
                kernel = values.clone()
            elif group % 2:
                kernel.sub_(values)
            else:
                kernel.add_(values)
            if keep_groups:
                groups.append(values)
        return kernel.mul_(spec.scale), groups if keep_groups else None


def kernel_matrix(input_factors: torch.Tensor, output_factors: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """The dense kernel matrix ``K`` [out, in] in fp32 (fp64 for fp64 factors), no threshold, no grad.

    Example:
        >>> a, b = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
        >>> kernel_matrix(a, b, KernelSpec("linear", 1.0)).shape
        torch.Size([3, 5])
    """
    return _kernel_and_group_values(input_factors, output_factors, spec)[0]


def kernel_entries(
    input_factors: torch.Tensor, output_factors: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, spec: KernelSpec
) -> torch.Tensor:
    """``K[rows[t], cols[t]]`` [m] for index vectors ``rows``, ``cols`` [m], without forming ``K``."""
    with torch.no_grad():
        a = _upcast(input_factors.index_select(1, cols))  # [H, m, d]; 3x faster than [:, cols] on CPU
        b = _upcast(output_factors.index_select(1, rows))
        if spec.name == "linear":
            return spec.scale * (a * b).sum((0, 2))
        squared = (a - b).square().sum(2)  # [H, m]
        values = squared.sqrt() if spec.name == "distance_diff" else torch.exp(-spec.gamma * squared)
        signs = torch.tensor([_coefficient(spec, h) for h in range(a.shape[0])], device=a.device)
        return (signs[:, None] * values).sum(0)


def sparse_delta(kernel: torch.Tensor, threshold: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """``E`` from ``K``: entries with ``|K| >= threshold`` (times ``|K|`` if ``magnitude``), zeros elsewhere."""
    absolute = kernel.abs()
    kept = kernel * absolute if magnitude else kernel
    return torch.where(absolute >= threshold, kept, 0.0)


def kernel_factor_grads(
    input_factors: torch.Tensor,
    output_factors: torch.Tensor,
    grad_kernel: torch.Tensor,
    spec: KernelSpec,
    group_values: Optional[list[torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dA [H, in, d], dL/dB [H, out, d])`` from ``dL/dK`` [out, in], at least in fp32.

    Distance kernels: with ``W = dL/dK * dkappa/d(||a-b||^2) * 2`` (``1/||a - b||`` for
    distance_diff, 0 where the distance is 0; ``-2 gamma exp(-gamma ||a-b||^2)`` for rbf),
    ``dA_h = c_h (colsum(W) * A_h - W^T B_h)`` and ``dB_h = c_h (rowsum(W) * B_h - W A_h)``; each
    is one GEMM with an appended column of ones, which yields the row or column sums too.
    ``group_values`` (each group's ``kappa``, from :func:`_kernel_and_group_values`) saves
    recomputing them; they are consumed. ``grad_kernel`` is left unchanged.
    """
    a_all, b_all, grad_kernel = _upcast(input_factors), _upcast(output_factors), _upcast(grad_kernel)
    grad_a, grad_b = torch.empty_like(a_all), torch.empty_like(b_all)
    for group in range(a_all.shape[0]):
        a, b = a_all[group], b_all[group]
        if spec.name == "linear":
            weights = spec.scale * grad_kernel
            grad_a[group], grad_b[group] = weights.T @ b, weights @ a
            continue
        values = group_values[group] if group_values is not None else _group_kappa(a, b, spec)
        coefficient = _coefficient(spec, group)
        if spec.name == "distance_diff":  # W = dL/dK / ||a - b||, 0 at distance 0 (where 0/0 and x/0 land)
            weights = torch.nan_to_num_(torch.div(grad_kernel, values, out=values), nan=0.0, posinf=0.0, neginf=0.0)
        else:  # W = dL/dK * kappa, the -2 gamma folded into the coefficient
            weights, coefficient = values.mul_(grad_kernel), -2 * spec.gamma * coefficient
        sums_a = weights.T @ torch.cat([-b, torch.ones_like(b[:, :1])], 1)  # [in, d + 1]: -W^T B | colsum(W)
        sums_b = weights @ torch.cat([-a, torch.ones_like(a[:, :1])], 1)  # [out, d + 1]: -W A | rowsum(W)
        grad_a[group] = sums_a[:, :-1].addcmul_(sums_a[:, -1:], a).mul_(coefficient)
        grad_b[group] = sums_b[:, :-1].addcmul_(sums_b[:, -1:], b).mul_(coefficient)
    return grad_a, grad_b


# Rows of K formed at once by the torch path: 2^20 entries (4 MiB in fp32) per transient matrix.
# Unchunked, the backward of one 4096 x 4096 layer held ~6 such matrices of 64 MiB.
CHUNK_ENTRIES = 2**20


def _row_chunks(num_out: int, num_in: int) -> list[slice]:
    rows = max(1, CHUNK_ENTRIES // num_in)
    return [slice(start, min(start + rows, num_out)) for start in range(0, num_out, rows)]


def _accumulate_factor_grads(
    kernel: torch.Tensor, group_values: Optional[list[torch.Tensor]], grad_rows: torch.Tensor, x: torch.Tensor,
    input_factors: torch.Tensor, output_factors: torch.Tensor, rows: slice, threshold: torch.Tensor,
    spec: KernelSpec, grad_a: torch.Tensor, grad_b: torch.Tensor,
) -> None:  # fmt: skip
    """Add one row chunk's share to ``grad_a`` and fill ``grad_b[:, rows]``; ``kernel`` [rows, in] and
    ``group_values`` are consumed."""
    grad_kernel = _upcast(grad_rows).T @ _upcast(x)
    absolute = kernel.abs_()
    if spec.magnitude:
        grad_kernel.mul_(torch.where(absolute >= threshold, absolute, 0.0))
    else:
        grad_kernel.masked_fill_(absolute < threshold, 0.0)
    del kernel, absolute
    chunk_grad_a, grad_b[:, rows] = kernel_factor_grads(
        input_factors, output_factors[:, rows], grad_kernel, spec, group_values
    )
    grad_a += chunk_grad_a


def snell_factor_grads_reference(
    x: torch.Tensor, grad_output: torch.Tensor, input_factors: torch.Tensor, output_factors: torch.Tensor,
    threshold: torch.Tensor, spec: KernelSpec,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dL/dA, dL/dB)`` (at least fp32) of ``y = x @ E^T`` from ``x`` [T, in] and ``dL/dy`` [T, out].

    ``dL/dE = dy^T x`` is formed by row chunks, masked to the kept entries and pushed through the
    kernel; ``E`` itself is not needed, so this serves both the matmul's backward and a weight that
    holds ``E`` in place.
    """
    grad_a = torch.zeros_like(_upcast(input_factors))
    grad_b = torch.empty_like(_upcast(output_factors))
    for rows in _row_chunks(output_factors.shape[1], input_factors.shape[1]):
        kernel, groups = _kernel_and_group_values(input_factors, output_factors[:, rows], spec, keep_groups=True)
        _accumulate_factor_grads(
            kernel, groups, grad_output[:, rows], x, input_factors, output_factors, rows, threshold, spec, grad_a,
            grad_b,
        )  # fmt: skip
    return grad_a, grad_b


@torch.no_grad()
def kept_entries(
    input_factors: torch.Tensor,
    output_factors: torch.Tensor,
    threshold: torch.Tensor,
    spec: KernelSpec,
    transposed: bool = False,
    index_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat indices [k], values [k] fp32)`` of the non-zero entries of ``E``, formed by row chunks.

    Indices are sorted and address ``E`` [out, in], or ``E^T`` [in, out] if ``transposed`` (a
    ``Conv1D`` weight). Entries that are kept but zero (an all-zero initial delta) are left out.

    Example:
        >>> a, b = torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[2.0], [1.0]]])  # K = [[2, 0], [1, 0]]
        >>> kept_entries(a, b, torch.tensor(1.5), KernelSpec("linear", 1.0))
        (tensor([0]), tensor([2.]))
    """
    num_in, num_out = input_factors.shape[1], output_factors.shape[1]
    num_rows, num_cols = (num_in, num_out) if transposed else (num_out, num_in)
    all_indices, all_values = [], []
    for rows in _row_chunks(num_rows, num_cols):
        if transposed:
            kernel = kernel_matrix(input_factors[:, rows], output_factors, spec).T
        else:
            kernel = kernel_matrix(input_factors, output_factors[:, rows], spec)
        kernel = kernel.reshape(-1)
        absolute = kernel.abs()
        # kept and non-zero: at a threshold <= 0 (an all-zero initial delta) every entry is kept
        positions = (absolute >= threshold.clamp_min(torch.finfo(kernel.dtype).tiny)).nonzero().squeeze(1)
        values = kernel[positions]
        all_indices.append((positions + rows.start * num_cols).to(index_dtype))
        all_values.append(values.mul_(absolute[positions]) if spec.magnitude else values)
    return torch.cat(all_indices), torch.cat(all_values)


class _ReferenceSnellMatmul(torch.autograd.Function):
    """Torch path: ``E`` is formed in forward and again in backward, by row chunks, and never saved."""

    @staticmethod
    def forward(ctx, x, input_factors, output_factors, threshold, spec: KernelSpec):
        y = x.new_empty(x.shape[0], output_factors.shape[1])
        for rows in _row_chunks(output_factors.shape[1], input_factors.shape[1]):
            kernel = kernel_matrix(input_factors, output_factors[:, rows], spec)
            y[:, rows] = x @ sparse_delta(kernel, threshold, spec.magnitude).to(x.dtype).T
        ctx.save_for_backward(x, input_factors, output_factors, threshold)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, input_factors, output_factors, threshold = ctx.saved_tensors
        spec = ctx.spec
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_a = torch.zeros_like(_upcast(input_factors))
        grad_b = torch.empty_like(_upcast(output_factors))
        for rows in _row_chunks(output_factors.shape[1], input_factors.shape[1]):
            kernel, groups = _kernel_and_group_values(input_factors, output_factors[:, rows], spec, keep_groups=True)
            grad_rows = grad_output[:, rows]
            if grad_x is not None:
                grad_x += grad_rows @ sparse_delta(kernel, threshold, spec.magnitude).to(grad_output.dtype)
            _accumulate_factor_grads(
                kernel, groups, grad_rows, x, input_factors, output_factors, rows, threshold, spec, grad_a, grad_b
            )
        return grad_x, grad_a.to(input_factors.dtype), grad_b.to(output_factors.dtype), None, None


def snell_delta_matmul_reference(
    x: torch.Tensor,
    input_factors: torch.Tensor,
    output_factors: torch.Tensor,
    threshold: torch.Tensor,
    spec: KernelSpec,
) -> torch.Tensor:
    """``x @ E^T`` [T, out] for ``x`` [T, in] (torch path; the spec of the Triton kernels).

    Example:
        >>> a, b = torch.randn(2, 5, 4, requires_grad=True), torch.randn(2, 3, 4)
        >>> y = snell_delta_matmul_reference(torch.randn(7, 5), a, b, torch.tensor(0.0), KernelSpec("rbf", 0.1))
        >>> y.shape
        torch.Size([7, 3])
    """
    return _ReferenceSnellMatmul.apply(x, input_factors, output_factors, threshold, spec)


def device_function(function: Callable) -> Callable:
    """``triton.jit`` for a helper called from kernels: inlined when compiled, run by Triton's
    interpreter under ``TRITON_INTERPRET=1`` (a plain ``JITFunction`` refuses calls there)."""
    if triton is None:
        return function

    class _DeviceFunction(JITFunction):
        def __call__(self, *args, **kwargs):
            return InterpretedFunction(self.fn)(*args, **kwargs)

    return _DeviceFunction(function)


@device_function
def _load_factor(ptr, group, offs_rows, num_rows, D, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_rows[:, None] < num_rows) & (offs_d[None, :] < D)
    pointers = ptr + (group * num_rows + offs_rows[:, None]) * D + offs_d[None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@device_function
def _group_values(a, b, KERNEL: tl.constexpr, gamma):
    """kappa tile [BLOCK_O, BLOCK_I] of one group and its squared distances (or the dot products)."""
    dot = tl.dot(b, tl.trans(a), input_precision="ieee")
    values, squared = dot, dot
    if KERNEL != 0:
        squared = tl.maximum(tl.sum(b * b, 1)[:, None] + tl.sum(a * a, 1)[None, :] - 2 * dot, 0.0)
        if KERNEL == 1:
            values = tl.sqrt(squared)
        else:
            values = tl.exp(-gamma * squared)
    return values, squared


@device_function
def _signed(scale, group: tl.constexpr, KERNEL: tl.constexpr):
    """c_h: ``scale`` for the linear kernel and even groups, ``-scale`` for odd groups of the others."""
    sign = 1.0
    if KERNEL != 0:
        if group % 2 == 1:
            sign = -1.0
    return sign * scale


@device_function
def _kernel_tile(
    a_ptr, b_ptr, offs_i, offs_o, IN, OUT, D, scale, gamma,
    H: tl.constexpr, KERNEL: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """K tile [BLOCK_O, BLOCK_I] in fp32, summed over the H groups."""
    tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for group in tl.static_range(H):
        a = _load_factor(a_ptr, group, offs_i, IN, D, BLOCK_D)
        b = _load_factor(b_ptr, group, offs_o, OUT, D, BLOCK_D)
        values, _ = _group_values(a, b, KERNEL, gamma)
        tile += _signed(scale, group, KERNEL) * values
    return tile


@device_function
def _sparse_tile(kernel, tau, MAGNITUDE: tl.constexpr):
    absolute = tl.abs(kernel)
    kept = kernel
    if MAGNITUDE:
        kept = kernel * absolute
    return tl.where(absolute >= tau, kept, 0.0)


@lazy_jit
def _apply_delta_kernel(
    inputs_ptr, a_ptr, b_ptr, tau_ptr, outputs_ptr, T, IN, OUT, D, scale, gamma,
    TRANSPOSED: tl.constexpr, H: tl.constexpr, KERNEL: tl.constexpr, MAGNITUDE: tl.constexpr,
    NATIVE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Forward ``y = x @ E^T`` (``TRANSPOSED=False``) or backward ``dx = dy @ E`` (``True``).

    A program owns a [BLOCK_T, BLOCK_N] tile of the output and loops over the reduced dimension
    in steps of BLOCK_N, computing each [BLOCK_N, BLOCK_N] tile of E on the fly. ``NATIVE_DOT``
    (bf16/fp16 activations): the product runs on tensor cores with E cast to the activations'
    dtype and fp32 accumulation, as the torch reference computes it.
    """
    num_reduced, num_outputs = IN, OUT
    if TRANSPOSED:
        num_reduced, num_outputs = OUT, IN
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tau = tl.load(tau_ptr)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for start in range(0, num_reduced, BLOCK_N):
        offs_m = start + tl.arange(0, BLOCK_N).to(tl.int64)
        in_mask = (offs_t[:, None] < T) & (offs_m[None, :] < num_reduced)
        inputs = tl.load(inputs_ptr + offs_t[:, None] * num_reduced + offs_m[None, :], mask=in_mask, other=0.0)
        offs_in, offs_out = offs_m, offs_n
        if TRANSPOSED:
            offs_in, offs_out = offs_n, offs_m
        tile = _kernel_tile(
            a_ptr, b_ptr, offs_in, offs_out, IN, OUT, D, scale, gamma, H, KERNEL, BLOCK_N, BLOCK_N, BLOCK_D
        )
        delta = _sparse_tile(tile, tau, MAGNITUDE)  # [out block, in block]
        if not TRANSPOSED:
            delta = tl.trans(delta)
        if NATIVE_DOT:
            acc += tl.dot(inputs, delta.to(inputs.dtype))
        else:
            acc += tl.dot(inputs.to(tl.float32), delta, input_precision="ieee")
    out_mask = (offs_t[:, None] < T) & (offs_n[None, :] < num_outputs)
    tl.store(outputs_ptr + offs_t[:, None] * num_outputs + offs_n[None, :], acc, mask=out_mask)


@lazy_jit
def _grad_factors_kernel(
    x_ptr, dy_ptr, a_ptr, b_ptr, tau_ptr, da_ptr, db_ptr, T, IN, OUT, D, scale, gamma,
    H: tl.constexpr, KERNEL: tl.constexpr, MAGNITUDE: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_N, BLOCK_N] tile of dL/dK = mask * (dy^T x), pushed into dA, dB with atomics.

    ``NATIVE_DOT`` (bf16/fp16 ``x`` and ``dy``): ``dy^T x`` on tensor cores, whose products of
    16-bit numbers are exact in the fp32 accumulator, as in the reference's upcast product. The
    factor-gradient products stay ``ieee``: their operands are fp32 sums whose tf32 rounding (2^-11)
    would exceed the tests' 1e-5 tolerance.
    """
    offs_o = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    grad = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T).to(tl.int64)
        dy_mask = (offs_t[:, None] < T) & (offs_o[None, :] < OUT)
        dy = tl.load(dy_ptr + offs_t[:, None] * OUT + offs_o[None, :], mask=dy_mask, other=0.0)
        x_mask = (offs_t[:, None] < T) & (offs_i[None, :] < IN)
        x = tl.load(x_ptr + offs_t[:, None] * IN + offs_i[None, :], mask=x_mask, other=0.0)
        if NATIVE_DOT:
            grad += tl.dot(tl.trans(dy), x)
        else:
            grad += tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), input_precision="ieee")
    tau = tl.load(tau_ptr)
    tile = _kernel_tile(a_ptr, b_ptr, offs_i, offs_o, IN, OUT, D, scale, gamma, H, KERNEL, BLOCK_N, BLOCK_N, BLOCK_D)
    absolute = tl.abs(tile)
    if MAGNITUDE:
        grad = grad * absolute
    grad = tl.where(absolute >= tau, grad, 0.0)
    offs_d = tl.arange(0, BLOCK_D)
    for group in tl.static_range(H):
        a = _load_factor(a_ptr, group, offs_i, IN, D, BLOCK_D)
        b = _load_factor(b_ptr, group, offs_o, OUT, D, BLOCK_D)
        coefficient = _signed(scale, group, KERNEL)
        if KERNEL == 0:
            weights = coefficient * grad
            grad_a = tl.dot(tl.trans(weights), b, input_precision="ieee")
            grad_b = tl.dot(weights, a, input_precision="ieee")
        else:
            values, squared = _group_values(a, b, KERNEL, gamma)
            if KERNEL == 1:
                pair = tl.where(squared > 0, tl.rsqrt(tl.maximum(squared, 1e-30)), 0.0)
            else:
                pair = -2.0 * gamma * values
            weights = coefficient * grad * pair
            grad_a = tl.sum(weights, 0)[:, None] * a - tl.dot(tl.trans(weights), b, input_precision="ieee")
            grad_b = tl.sum(weights, 1)[:, None] * b - tl.dot(weights, a, input_precision="ieee")
        a_mask = (offs_i[:, None] < IN) & (offs_d[None, :] < D)
        tl.atomic_add(da_ptr + (group * IN + offs_i[:, None]) * D + offs_d[None, :], grad_a, mask=a_mask)
        b_mask = (offs_o[:, None] < OUT) & (offs_d[None, :] < D)
        tl.atomic_add(db_ptr + (group * OUT + offs_o[:, None]) * D + offs_d[None, :], grad_b, mask=b_mask)


BLOCK_T, BLOCK_N = 32, 64  # untuned: no GPU was available when this was written


def _native_dot(*activations: torch.dtype) -> bool:
    """Whether the kernels take products of these activations (x, and dy) on tensor cores (``NATIVE_DOT``).

    Same-dtype fp16 or bf16 operands; bf16 not under Triton's CPU interpreter, whose bf16 ``tl.dot``
    returns garbage (errors of 1e10 on a 16x16 product; fp16 and a real GPU compile are fine).
    """
    if len(set(activations)) != 1:
        return False
    return activations[0] == torch.float16 or (activations[0] == torch.bfloat16 and not interpreter_requested())


def _launch_constants(input_factors: torch.Tensor, spec: KernelSpec, native_dot: bool) -> dict:
    """Constexprs of both kernels."""
    groups, _, rank = input_factors.shape
    return dict(
        H=groups, KERNEL=KERNELS.index(spec.name), MAGNITUDE=spec.magnitude, NATIVE_DOT=native_dot,
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(rank)),
    )  # fmt: skip


class _TritonSnellMatmul(torch.autograd.Function):
    """Fused path: kernel tiles live in registers only; forward and backward are Triton kernels."""

    @staticmethod
    def forward(ctx, x, input_factors, output_factors, threshold, spec: KernelSpec):
        x, a, b = x.contiguous(), input_factors.contiguous(), output_factors.contiguous()
        tokens, (_, num_in, rank), num_out = x.shape[0], a.shape, b.shape[1]
        y = torch.empty(tokens, num_out, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(num_out, BLOCK_N))
        _apply_delta_kernel[grid](
            x, a, b, threshold, y, tokens, num_in, num_out, rank, spec.scale, spec.gamma,
            TRANSPOSED=False, **_launch_constants(a, spec, _native_dot(x.dtype)),
        )  # fmt: skip
        ctx.save_for_backward(x, a, b, threshold)
        ctx.spec = spec
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, a, b, threshold = ctx.saved_tensors
        spec, grad_output = ctx.spec, grad_output.contiguous()
        tokens, (_, num_in, rank), num_out = x.shape[0], a.shape, b.shape[1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty(tokens, num_in, dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(num_in, BLOCK_N))
            _apply_delta_kernel[grid](
                grad_output, a, b, threshold, grad_x, tokens, num_in, num_out, rank, spec.scale, spec.gamma,
                TRANSPOSED=True, **_launch_constants(a, spec, _native_dot(grad_output.dtype)),
            )  # fmt: skip
            grad_x = grad_x.to(x.dtype)
        grad_a, grad_b = _launch_factor_grads(x, grad_output, a, b, threshold, spec)
        return grad_x, grad_a.to(a.dtype), grad_b.to(b.dtype), None, None


def _launch_factor_grads(
    x: torch.Tensor, grad_output: torch.Tensor, a: torch.Tensor, b: torch.Tensor, threshold: torch.Tensor,
    spec: KernelSpec,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """fp32 ``(dA, dB)`` by the fused kernel; every tensor contiguous, ``threshold`` fp32 [1]."""
    tokens, (_, num_in, rank), num_out = x.shape[0], a.shape, b.shape[1]
    grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
    grid = (triton.cdiv(num_out, BLOCK_N), triton.cdiv(num_in, BLOCK_N))
    _grad_factors_kernel[grid](
        x, grad_output, a, b, threshold, grad_a, grad_b, tokens, num_in, num_out, rank, spec.scale, spec.gamma,
        **_launch_constants(a, spec, _native_dot(x.dtype, grad_output.dtype)),
    )  # fmt: skip
    return grad_a, grad_b


# Opaque to torch.compile (a graph break on CUDA): Dynamo is not shown our lazily jitted launchers.
@torch.compiler.disable
def snell_delta_matmul_triton(
    x: torch.Tensor,
    input_factors: torch.Tensor,
    output_factors: torch.Tensor,
    threshold: torch.Tensor,
    spec: KernelSpec,
) -> torch.Tensor:
    """Fused Triton version of :func:`snell_delta_matmul_reference` (same signature and result)."""
    if triton is None:
        raise RuntimeError("snell_delta_matmul_triton needs the triton package (pip install 'peft-sparse[triton]')")
    return _TritonSnellMatmul.apply(x, input_factors, output_factors, threshold.float().reshape(1), spec)


def snell_delta_matmul(
    x: torch.Tensor,
    input_factors: torch.Tensor,
    output_factors: torch.Tensor,
    threshold: torch.Tensor,
    spec: KernelSpec,
) -> torch.Tensor:
    """``x @ E^T`` [..., out] for ``x`` [..., in]: the Triton kernels on CUDA, the torch reference elsewhere.

    Example:
        >>> a, b = torch.zeros(2, 8, 4), torch.zeros(2, 6, 4)
        >>> snell_delta_matmul(torch.randn(3, 5, 8), a, b, torch.tensor(0.0), KernelSpec("distance_diff", 0.1)).shape
        torch.Size([3, 5, 6])
    """
    tokens = x.reshape(-1, x.shape[-1])
    matmul = snell_delta_matmul_triton if use_triton(x) else snell_delta_matmul_reference
    y = matmul(tokens, input_factors, output_factors, threshold, spec)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def snell_factor_grads(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    input_factors: torch.Tensor,
    output_factors: torch.Tensor,
    threshold: torch.Tensor,
    spec: KernelSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dA, dL/dB)`` in the factors' dtypes from ``x`` [T, in] and ``dL/dy`` [T, out] of ``y = x @ E^T``:
    the fused Triton kernel on CUDA, :func:`snell_factor_grads_reference` elsewhere.

    What a weight holding ``E`` in place needs in backward (the base GEMM already gave ``dL/dx``).

    Example:
        >>> a, b = torch.randn(2, 8, 4), torch.randn(2, 6, 4)
        >>> grad_a, grad_b = snell_factor_grads(torch.randn(3, 8), torch.randn(3, 6), a, b, torch.tensor(0.5),
        ...                                     KernelSpec("rbf", 0.1))
        >>> grad_a.shape, grad_b.shape
        (torch.Size([2, 8, 4]), torch.Size([2, 6, 4]))
    """
    if use_triton(x):
        grad_a, grad_b = _launch_factor_grads(
            x.contiguous(), grad_output.contiguous(), input_factors.contiguous(), output_factors.contiguous(),
            threshold.float().reshape(1), spec,
        )  # fmt: skip
    else:
        grad_a, grad_b = snell_factor_grads_reference(x, grad_output, input_factors, output_factors, threshold, spec)
    return grad_a.to(input_factors.dtype), grad_b.to(output_factors.dtype)
