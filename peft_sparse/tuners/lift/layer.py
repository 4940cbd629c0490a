"""LIFT's layer: the shared sparse-delta layer under LIFT's own state-dict names (peft needs one prefix per method)."""

from __future__ import annotations

from ...sparse.layer import SparseDeltaLinear


class LiftDeltaLinear(SparseDeltaLinear):
    """Sparse-delta adapter whose values/indices are saved as ``lift_values`` / ``lift_indices``."""

    adapter_layer_names = ("lift_values",)
    other_param_names = ("lift_indices",)
