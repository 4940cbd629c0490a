"""Optional Triton import and the rule every kernel uses to pick Triton or its torch reference.

Triton is optional: without it (or on CPU tensors) every op runs its torch reference.
``TRITON_INTERPRET=1`` forces the Triton path on CPU tensors through Triton's interpreter;
Triton reads that variable when a kernel is *decorated*, so kernels here are decorated on
their first launch (``lazy_jit``), not at import: setting the variable at run time works.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional dependency: every op falls back to torch
    triton = None
    tl = None


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` (read now, parsed by Triton) asks for the CPU interpreter."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors, or for any tensors under ``TRITON_INTERPRET=1``; else the torch reference."""
    if triton is None:
        return False
    if all(tensor.is_cuda for tensor in tensors):
        return True
    # under torch.compile, CPU tensors take the reference: Dynamo cannot trace Triton's knob (a C getenv)
    return not torch.compiler.is_compiling() and interpreter_requested()


class lazy_jit:  # noqa: N801  (used as a decorator, like triton.jit)
    """``triton.jit`` applied at first launch, once per interpreter setting.

    Example:
        >>> @lazy_jit
        ... def double(x_ptr, BLOCK: tl.constexpr):
        ...     offsets = tl.arange(0, BLOCK)
        ...     tl.store(x_ptr + offsets, 2 * tl.load(x_ptr + offsets))
        >>> double[(1,)](torch.ones(16, device="cuda"), BLOCK=16)  # doctest: +SKIP
    """

    def __init__(self, function: Callable) -> None:
        self.function = function
        self._compiled: dict[bool, object] = {}

    def __getitem__(self, grid):
        interpret = interpreter_requested()
        if interpret and not isinstance(tl.sum, triton.runtime.interpreter.InterpretedFunction):
            # Triton's own library (tl.sum, tl.zeros, ...) was decorated for the GPU at import
            raise RuntimeError("to run kernels on CPU, set TRITON_INTERPRET=1 before triton is imported (peft imports it)")
        if interpret not in self._compiled:
            self._compiled[interpret] = triton.jit(self.function)
        return self._compiled[interpret][grid]
