"""Kernels for the sparse hot paths.

Each op dispatches to a Triton kernel on CUDA tensors (or on CPU tensors under
``TRITON_INTERPRET=1``) and to a pure-torch reference with the same signature
otherwise; the reference is the spec the kernels are tested against.
"""

from .sddmm import sampled_dense_dense_matmul
from .snell_matmul import snell_delta_matmul
from .sparse_matmul import sparse_delta_matmul, sparse_matmul_accumulate
from .sparse_merge import scatter_add, scatter_assign
from .topk_scan import topk_candidates

__all__ = [
    "sampled_dense_dense_matmul",
    "scatter_add",
    "scatter_assign",
    "snell_delta_matmul",
    "sparse_delta_matmul",
    "sparse_matmul_accumulate",
    "topk_candidates",
]
