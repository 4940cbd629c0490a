"""Kernels for the sparse hot paths.

Each op has a pure-torch reference with the same signature; it is the spec
the GPU kernels are tested against and the path used on CPU.
"""

from .sddmm import sampled_dense_dense_matmul
from .sparse_merge import scatter_assign

__all__ = ["sampled_dense_dense_matmul", "scatter_assign"]
