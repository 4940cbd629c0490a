"""The LIFT tuner: principal-weight masks on the shared sparse-delta layer, optionally refreshed."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ...quantization import weight_matrix_shape
from ...sparse.indices import index_dtype_for, layer_seed
from ...sparse.layer import SparseDeltaLayer
from ...sparse.principal import principal_weight_indices
from ...sparse.selection import GrowthStatistics
from ...sparse.tuner import SparseDeltaTuner
from .config import LiftConfig
from .layer import LiftDeltaLinear, QuantizedLiftDeltaLinear


class LiftModel(SparseDeltaTuner):
    """LIFT (principal weights) on a transformers model; build it with ``get_peft_model``.

    Masks are chosen layer by layer (peak extra memory: about one matrix in fp32), with a progress
    bar. Loading a saved adapter for inference skips the SVDs: its indices come from the checkpoint.
    On a bitsandbytes 4-bit/8-bit base the SVD needs the weight, so each matrix is dequantized for its
    own selection (and for each mask refresh) and freed right after; training keeps only the
    quantized weight and applies the delta as a sparse term.

    Example:
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.LiftConfig(density=0.05, rank=128))  # doctest: +SKIP
    """

    prefix: str = "lift_"
    delta_layer_cls = LiftDeltaLinear
    quantized_layer_cls = QuantizedLiftDeltaLinear

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._selection_progress: Optional[tqdm] = None
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _num_values(self, config: LiftConfig, adapter_name: str, module_name: str, num_entries: int) -> int:
        return config.count_for(tuple(self._weight_matrix_shape(module_name)))

    def _weight_matrix_shape(self, module_name: str) -> tuple[int, int]:
        module = self.model.get_submodule(module_name)
        return weight_matrix_shape(module.get_base_layer() if hasattr(module, "get_base_layer") else module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:  # also for add_adapter, which peft runs without _post_injection_hook
            if self._selection_progress is not None:
                self._selection_progress.close()
                self._selection_progress = None

    def _select(self, config: LiftConfig, weight: torch.Tensor, count: int, module_name: str) -> torch.Tensor:
        return principal_weight_indices(
            weight,
            rank=config.rank_for(tuple(weight.shape)),
            count=count,
            svd_method=config.svd_method,
            power_iterations=config.svd_power_iterations,
            seed=layer_seed(config.init_seed, module_name),
        )

    def _initial_indices(self, config: LiftConfig, base_layer: nn.Module, count: int, module_name: str):
        if config.inference_mode:
            # an adapter loaded for inference gets its indices from the checkpoint; any valid set will do here
            rows, cols = weight_matrix_shape(base_layer)
            return torch.arange(count, dtype=index_dtype_for(rows * cols))
        if self._selection_progress is None:  # created here: target_modules are resolved by now
            total = len(self._matched_weight_sizes(config))
            self._selection_progress = tqdm(total=total, desc="LIFT: selecting principal weights", unit="matrix")
        # a 4-bit/8-bit weight is dequantized for its SVD only, one matrix at a time
        indices = self._select(config, self._base_weight(module_name, base_layer), count, module_name)
        self._selection_progress.update()
        return indices

    def _replacement(
        self,
        config: LiftConfig,
        name: str,
        layer: SparseDeltaLayer,
        adapter_name: str,
        reselection_rate: float,
        statistics: Optional[GrowthStatistics],
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A mask refresh: the principal weights of the current ``W0 + delta``.

        Entries that stay keep their values and optimizer moments; entries that leave go back to
        ``W0`` (their delta is dropped, as in a prune step); new entries start at zero.
        """
        indices = layer.delta_indices[adapter_name]
        selected = self._select(config, layer.effective_weight(adapter_name), indices.numel(), name)
        selected = selected.to(device=indices.device, dtype=indices.dtype)
        dropped = torch.nonzero(~torch.isin(indices, selected)).flatten()
        grown = selected[~torch.isin(selected, indices)]
        return dropped, grown
