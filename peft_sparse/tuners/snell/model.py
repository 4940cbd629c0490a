"""The SNELL tuner: swaps target linears for SNELL layers; SNELLA's importance and budget allocation."""

from __future__ import annotations

from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...loading import AllOrNothingTuner
from ...sparse.indices import layer_seed
from ...sparse.in_place import SUPPORTED_BASE_LAYERS, mark_tied_weight
from .allocation import ImportanceTracker, allocate_budget, scheduled_budget
from .config import SnellConfig
from .layer import SnellLayer, SnellLinear, kept_count

SAMPLE_SEED = 0  # seeds each layer's threshold sample positions, together with the layer's name


class SnellModel(AllOrNothingTuner):
    """SNELL / SNELLA on a transformers model; build it with ``get_peft_model``.

    Example:
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.SnellConfig(r=32, sparsity=0.9))  # doctest: +SKIP
        >>> merged = model.merge_and_unload()  # doctest: +SKIP
    """

    prefix: str = "snell_"
    tuner_layer_cls = SnellLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._importance: dict[str, ImportanceTracker] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _prepare_adapter_config(self, peft_config: SnellConfig, model_config: dict) -> SnellConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(
                f"target module '{current_key}' is a {type(base).__name__}; SnellConfig supports torch.nn.Linear "
                "and transformers Conv1D. Change target_modules to leave it out."
            )
        if isinstance(target, SnellLinear):
            target.update_layer(adapter_name, config)
        else:
            new_module = SnellLinear(target, adapter_name, config, sample_seed=layer_seed(SAMPLE_SEED, current_key))
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        mark_tied_weight(target, self.model, config.delta_in_place)

    def snell_layers(self, adapter_name: str) -> Iterator[tuple[str, SnellLayer]]:
        """(module name, layer) of every SNELL layer that holds ``adapter_name``."""
        for name, module in self.model.named_modules():
            if isinstance(module, SnellLayer) and adapter_name in module.snell_input_factors:
                yield name, module

    def layer_sparsity(self, adapter_name: str = "default") -> dict[str, float]:
        """Current fraction of zeroed delta entries per layer."""
        return {name: layer.sparsity(adapter_name) for name, layer in self.snell_layers(adapter_name)}

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs) -> None:
        """Refused: a weighted sum of SNELL deltas is in general not a SNELL delta (see the error)."""
        raise ValueError(
            "add_weighted_adapter cannot combine SNELL adapters: a SNELL delta is a kernelized low-rank matrix "
            "thresholded to its largest entries, and a weighted sum of such deltas is in general not one, so no exact "
            "combination exists. To apply several SNELL adapters together, merge them into the base weights "
            "(model.merge_and_unload(adapter_names=[...])), or export each one to a LoRA "
            "(peft_sparse.export.export_to_lora) and combine those with LoRA's add_weighted_adapter"
        )

    # --- SNELLA -------------------------------------------------------------------------------

    def update_importance(self, adapter_name: str = "default") -> None:
        """Fold the factors' current ``|theta * grad|`` into the importance EMAs (call while grads exist)."""
        config = self.peft_config[adapter_name]
        tracker = self._importance.setdefault(
            adapter_name, ImportanceTracker(config.importance_beta, config.uncertainty_beta)
        )
        parameters = {}
        for name, layer in self.snell_layers(adapter_name):
            parameters[f"{name}.input"] = layer.snell_input_factors[adapter_name]
            parameters[f"{name}.output"] = layer.snell_output_factors[adapter_name]
        tracker.update(parameters)

    def importance_state(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """SNELLA's importance and uncertainty EMAs (empty before the first update), for checkpoints."""
        tracker = self._importance.get(adapter_name)
        return {} if tracker is None else tracker.state_dict()

    def load_importance_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Restore the EMAs saved by ``importance_state`` (resuming from a checkpoint)."""
        config = self.peft_config[adapter_name]
        tracker = ImportanceTracker(config.importance_beta, config.uncertainty_beta)
        tracker.load_state_dict(state)
        self._importance[adapter_name] = tracker

    def allocation_budget(self, adapter_name: str, step: int, total_steps: int) -> int:
        """SNELLA's global nonzero budget at ``step`` of ``total_steps``."""
        config = self.peft_config[adapter_name]
        sizes = [layer.num_entries for _, layer in self.snell_layers(adapter_name)]
        return scheduled_budget(
            initial=sum(kept_count(size, config.sparsity) for size in sizes),
            target=sum(kept_count(size, config.target_sparsity) for size in sizes),
            step=step,
            total_steps=total_steps,
            warmup_steps=config.allocation_warmup_steps,
            final_steps=config.allocation_final_steps,
        )

    def allocate(self, adapter_name: str, step: int, total_steps: int) -> dict[str, int]:
        """Split the scheduled budget across layers by importance and apply it; returns kept counts per layer."""
        layers = dict(self.snell_layers(adapter_name))
        tracker = self._importance.get(adapter_name)
        scores = {
            name: tracker.score([f"{name}.input", f"{name}.output"]) if tracker is not None else 0.0 for name in layers
        }
        counts = allocate_budget(
            self.allocation_budget(adapter_name, step, total_steps),
            scores,
            {name: layer.num_entries for name, layer in layers.items()},
        )
        for name, layer in layers.items():
            layer.set_num_kept(adapter_name, counts[name])
        return counts

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._importance.pop(adapter_name, None)


def snell_tuners(model: nn.Module) -> Iterator[SnellModel]:
    """Every SNELL tuner inside ``model`` (a PeftModel, possibly wrapped by DDP)."""
    for module in model.modules():
        if isinstance(module, SnellModel):
            yield module
