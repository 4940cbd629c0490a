"""LIFT's layer: the shared sparse-delta layer under LIFT's own state-dict names (peft needs one prefix per method)."""

from __future__ import annotations

from ...sparse.layer import SparseDeltaLinear
from ...sparse.quantized_layer import QuantizedSparseDeltaLinear


class LiftDeltaLinear(SparseDeltaLinear):
    """Sparse-delta adapter whose values/indices are saved as ``lift_values`` / ``lift_indices``."""

    adapter_layer_names = ("lift_values",)
    other_param_names = ("lift_indices",)


class QuantizedLiftDeltaLinear(QuantizedSparseDeltaLinear):
    """LIFT on a bitsandbytes 4-bit/8-bit base: the delta is a sparse term, saved under LIFT's names."""

    adapter_layer_names = ("lift_values",)
    other_param_names = ("lift_indices",)
