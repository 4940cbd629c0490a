"""Shared sparse-delta machinery: the layer, index sets, growth statistics, optimizer-state remapping."""

from .layer import SparseDeltaLayer, SparseDeltaLinear
from .tuner import SparseDeltaTuner

__all__ = ["SparseDeltaLayer", "SparseDeltaLinear", "SparseDeltaTuner"]
