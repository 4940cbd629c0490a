"""The RoSA tuner: LoRA plus a sparse part on each target weight; DSEE's mask at injection, RoSA's from gradients."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ...quantization import weight_matrix_shape
from ...sparse.indices import index_dtype_for, layer_seed, random_unique_indices
from ...sparse.layer import SparseDeltaLayer
from ...sparse.tuner import SparseDeltaTuner
from .config import RosaConfig
from .layer import LowRankPart, QuantizedRosaLinear, RosaLinear
from .mask import AccumulatedGradientMask, residual_magnitude_indices


class RosaModel(SparseDeltaTuner):
    """RoSA / DSEE (sparse plus low-rank) on a transformers model; build it with ``get_peft_model``.

    With ``mask_rule="gradient"`` train with ``trl_callbacks.RosaCallback``: it holds the sparse part
    back for ``mask_warmup_steps + mask_accumulation_steps`` optimizer steps and then sets its mask.
    Until then the indices are a seeded random placeholder (zero values, so the model is unchanged).

    Example:
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.RosaConfig(r=16, density=0.003))  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[RosaCallback()])  # doctest: +SKIP
    """

    prefix: str = "rosa_"
    delta_layer_cls = RosaLinear
    quantized_layer_cls = QuantizedRosaLinear

    def _initial_indices(self, config: RosaConfig, base_layer: nn.Module, count: int, module_name: str):
        rows, cols = weight_matrix_shape(base_layer)
        if config.mask_rule == "magnitude" and not config.inference_mode:
            weight = self._base_weight(module_name, base_layer)  # DSEE decomposes the pristine W0
            return residual_magnitude_indices(weight, config.r, count, layer_seed(config.init_seed, module_name))
        if config.inference_mode:  # indices come from the checkpoint; any valid set will do here
            return torch.arange(count, dtype=index_dtype_for(rows * cols))
        return random_unique_indices(rows * cols, count, layer_seed(config.init_seed, module_name))

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        is_new = not isinstance(target, LowRankPart)
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **kwargs)
        layer = getattr(parent, target_name)
        layer.update_low_rank(
            adapter_name, config.r, config.lora_alpha, config.lora_dropout, init_weights=config.init_weights,
            init_seed=layer_seed(config.init_seed, f"{current_key}.lora"), inference_mode=config.inference_mode,
        )  # fmt: skip
        if is_new and adapter_name not in self.active_adapters:
            layer.requires_grad_(False)

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        raise ValueError(
            "add_weighted_adapter does not combine RoSA adapters (a sparse part and a LoRA part each); merge them "
            "into the base model one after the other (merge_and_unload), or export each with export_to_lora and "
            "combine the LoRA adapters"
        )

    # --- RoSA's gradient mask ------------------------------------------------------------------

    def _growth_statistics(self, config: RosaConfig, layer: SparseDeltaLayer, adapter_name: str):
        if config.mask_rule != "gradient":
            return None
        device = layer.get_base_layer().weight.device
        return AccumulatedGradientMask(layer.weight_shape, config.gradient_statistic, device)

    def _adapter_layers(self, adapter_name: str) -> list[LowRankPart]:
        return [layer for _, layer in self.sparse_delta_layers() if adapter_name in layer.delta_values]

    def hold_back_sparse_part(self, adapter_name: str) -> None:
        """Leave the sparse part of ``adapter_name`` out of the forward (no gradient) until its mask is chosen."""
        for layer in self._adapter_layers(adapter_name):
            layer.mask_pending.add(adapter_name)

    def sparse_part_held_back(self, adapter_name: str) -> bool:
        return any(adapter_name in layer.mask_pending for layer in self._adapter_layers(adapter_name))

    def choose_gradient_mask(
        self, adapter_name: str, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> dict[str, float]:
        """Set every layer's mask to the top-k of the open window's statistic and let the sparse part train.

        The values restart at zero (the model is unchanged) and their optimizer state is reset.
        Returns ``reselect``'s density and churn statistics.
        """
        statistics = self.reselect(adapter_name, 1.0, optimizer)
        for layer in self._adapter_layers(adapter_name):
            layer.mask_pending.discard(adapter_name)
        return statistics

    def _replacement(self, config, name, layer, adapter_name, reselection_rate, statistics):
        """The whole mask at once: every slot is dropped and the top-k entries of the statistic grow."""
        if statistics is None or not statistics.observed:
            warnings.warn(
                f"layer '{name}' of adapter '{adapter_name}' saw no gradient in the mask window: it keeps its "
                "placeholder mask (seeded random entries)"
            )
            return None
        count = layer.num_values(adapter_name)
        grown = statistics.grow(count).to(layer.delta_indices[adapter_name].device)
        return torch.arange(count, device=grown.device), grown
