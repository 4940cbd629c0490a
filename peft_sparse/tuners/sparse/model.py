"""The sparse fine-tuning tuner: random initial indices, prune/regrow by AG or MA statistics."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ...quantization import weight_matrix_shape
from ...sparse.indices import layer_seed, random_unique_indices
from ...sparse.layer import SparseDeltaLayer
from ...sparse.selection import AccumulatedGradientGrowth, GrowthStatistics, MomentumApproximationGrowth
from ...sparse.tuner import SparseDeltaTuner
from .config import SparseConfig


class SparseModel(SparseDeltaTuner):
    """Sparse fine-tuning (SpIEL) of a transformers model; build it with ``get_peft_model``.

    Example:
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.SparseConfig(density=0.01))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """

    prefix: str = "sparse_"

    def _initial_indices(self, config: SparseConfig, base_layer: nn.Module, count: int, module_name: str):
        rows, cols = weight_matrix_shape(base_layer)
        return random_unique_indices(rows * cols, count, layer_seed(config.init_seed, module_name))

    def _growth_statistics(
        self, config: SparseConfig, layer: SparseDeltaLayer, adapter_name: str
    ) -> Optional[GrowthStatistics]:
        indices = layer.delta_indices[adapter_name]
        if config.selection == "ag":
            return AccumulatedGradientGrowth(indices, layer.weight_shape, num_candidates=indices.numel())
        if config.selection == "ma":
            return MomentumApproximationGrowth(indices, layer.weight_shape)
        return None
