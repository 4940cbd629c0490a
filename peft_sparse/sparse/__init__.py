"""Shared sparse-delta machinery: the layer, index sets, growth statistics, optimizer-state remapping."""

from .layer import SparseDeltaLayer, SparseDeltaLinear
from .quantized_layer import QuantizedSparseDeltaLinear
from .tuner import SparseDeltaTuner

__all__ = ["QuantizedSparseDeltaLinear", "SparseDeltaLayer", "SparseDeltaLinear", "SparseDeltaTuner"]
