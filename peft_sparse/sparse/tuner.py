"""Tuner base for methods that train a sparse delta (SFT, LIFT): injection, budgets, selection steps, loading checks."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..loading import AllOrNothingTuner
from .combine import (
    SPARSE_COMBINATION_TYPES, check_same_modules, check_weighted_adapter_arguments, combine_sparse_deltas,
    seeded_random,
)  # fmt: skip
from .compact_format import compact_tensors, expand_tensors
from .distributed import all_reduce_mean_, assign_full_, full_tensor
from ..quantization import dequantized_weight, quantization_of, weight_matrix_shape
from .in_place import mark_tied_weight
from .indices import check_index_set, layer_seed
from .layer import SUPPORTED_BASE_LAYERS, SparseDeltaLayer, SparseDeltaLinear
from .optimizer_state import remap_optimizer_state
from .quantized_layer import QuantizedSparseDeltaLinear
from .selection import GrowthStatistics, smallest_magnitude_positions


def split_budget(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``total`` entries over matrices in proportion to ``sizes`` (largest remainder; sums to ``total``)."""
    grand_total = sum(sizes.values())
    exact = {name: total * size / grand_total for name, size in sizes.items()}
    counts = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


class SparseDeltaTuner(AllOrNothingTuner):
    """Shared machinery; subclasses choose initial indices and growth statistics."""

    tuner_layer_cls = SparseDeltaLayer
    delta_layer_cls: type[SparseDeltaLinear] = SparseDeltaLinear
    # bitsandbytes 4-bit/8-bit bases: the delta is a sparse term instead of merged in place
    quantized_layer_cls: type[QuantizedSparseDeltaLinear] = QuantizedSparseDeltaLinear
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._budgets: dict[str, dict[str, int]] = {}
        self._window_statistics: dict[str, dict[str, GrowthStatistics]] = {}
        # add_weighted_adapter: indices of a composed adapter, by adapter and module, consumed by its injection
        self._prescribed_indices: dict[str, dict[str, torch.Tensor]] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # --- hooks for subclasses ----------------------------------------------------------------

    def _initial_indices(self, config, base_layer: nn.Module, count: int, module_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _base_weight(self, module_name: str, base_layer: nn.Module) -> torch.Tensor:
        """``W0`` of a target module for choosing indices: without other adapters' in-place deltas, dequantized."""
        layer = self.model.get_submodule(module_name)
        if isinstance(layer, SparseDeltaLayer) and layer.writes_in_place:  # may hold another adapter's delta
            return layer.pristine_weight()
        return dequantized_weight(base_layer)  # a 4-bit/8-bit weight: for this choice only

    def _growth_statistics(self, config, layer: SparseDeltaLayer, adapter_name: str) -> Optional[GrowthStatistics]:
        """Statistics for the next selection step, or None if the method never changes its indices."""
        return None

    # --- injection ---------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _matched_weight_sizes(self, config) -> dict[str, int]:
        sizes = {}
        for name, module in self.model.named_modules():
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, SUPPORTED_BASE_LAYERS) and self._check_target_module_exists(config, name):
                rows, cols = weight_matrix_shape(base)
                sizes[name] = rows * cols
        return sizes

    def _count_for(self, config, adapter_name: str, module_name: str, num_entries: int) -> int:
        """Trainable entries of one module: ``values_per_module`` when the config has it, else the method's budget."""
        if config.values_per_module is None:
            return self._num_values(config, adapter_name, module_name, num_entries)
        if module_name not in config.values_per_module:
            raise ValueError(
                f"values_per_module has no count for target module '{module_name}'; it names "
                f"{len(config.values_per_module)} modules, e.g. {sorted(config.values_per_module)[:3]}"
            )
        return config.values_per_module[module_name]

    def _num_values(self, config, adapter_name: str, module_name: str, num_entries: int) -> int:
        if config.density is not None:
            return max(1, round(config.density * num_entries))
        if adapter_name not in self._budgets:
            sizes = self._matched_weight_sizes(config)
            if config.num_tunable_weights > sum(sizes.values()):
                raise ValueError(
                    f"num_tunable_weights must be at most the {sum(sizes.values())} entries of the target "
                    f"modules, got {config.num_tunable_weights}"
                )
            self._budgets[adapter_name] = split_budget(config.num_tunable_weights, sizes)
        return self._budgets[adapter_name][module_name]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(
                f"target module '{current_key}' is a {type(base).__name__}; {type(config).__name__} supports "
                f"torch.nn.Linear and transformers Conv1D. Change target_modules to leave it out."
            )
        rows, cols = weight_matrix_shape(base)
        indices = self._prescribed_indices.get(adapter_name, {}).get(current_key)
        if indices is None:
            count = self._count_for(config, adapter_name, current_key, rows * cols)
            indices = self._initial_indices(config, base, count, current_key)
        indices = indices.to(base.weight.device)
        init = dict(init_weights=config.init_weights, init_seed=layer_seed(config.init_seed, f"{current_key}.values"))
        layer_cls = self.quantized_layer_cls if quantization_of(base) is not None else self.delta_layer_cls
        if isinstance(target, layer_cls):
            target.update_layer(adapter_name, indices, **init)
        else:
            new_module = layer_cls(target, adapter_name, indices, writes_in_place=config.delta_in_place, **init)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        mark_tied_weight(target, self.model, config.delta_in_place)

    # --- composition ---------------------------------------------------------------------------

    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        density: Optional[float] = None,
        majority_sign_method: str = "total",
        seed: Optional[int] = None,
    ) -> None:
        """Add adapter ``adapter_name``: per matrix, the union of the ``adapters``' indices with merged values.

        ``combination_type``: ``"linear"`` (exact weighted sum), ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"`` or ``"magnitude_prune"``, which first keep a ``density`` fraction of each
        source's own values (see :mod:`peft_sparse.sparse.combine`). ``seed`` seeds dare's random
        pruning without touching torch's global generator (None: the global generator, as peft).
        The new adapter is an ordinary one of the same method (its config: the first source's, with
        ``values_per_module`` holding the union's counts): it trains, saves, loads and merges.
        Entries that pruning zeroed stay in it, trainable. The sources are left unchanged.

        Example:
            >>> model.add_weighted_adapter(["arith", "caps"], [1.0, 1.0], "both")  # doctest: +SKIP
            >>> model.set_adapter("both")  # doctest: +SKIP
        """
        check_weighted_adapter_arguments(
            self.peft_config, adapters, weights, adapter_name, combination_type, SPARSE_COMBINATION_TYPES, density,
            majority_sign_method,
        )  # fmt: skip
        layers = [(name, layer) for name, layer in self.sparse_delta_layers()
                  if set(adapters) & set(layer.delta_values)]  # fmt: skip
        check_same_modules({a: {name for name, layer in layers if a in layer.delta_values} for a in adapters})
        combined = {}
        with seeded_random(seed, layers[0][1].delta_values[adapters[0]].device):
            for name, layer in layers:
                union, values = combine_sparse_deltas(
                    [layer.delta_indices[a] for a in adapters],
                    [full_tensor(layer.delta_values[a].detach()) for a in adapters],
                    weights, combination_type, density, majority_sign_method,
                )  # fmt: skip
                combined[name] = (union.to(layer.delta_indices[adapters[0]].dtype), values)
        self.peft_config[adapter_name] = replace(
            self.peft_config[adapters[0]], init_weights=True,
            values_per_module={name: union.numel() for name, (union, _) in combined.items()},
        )  # fmt: skip
        self._prescribed_indices[adapter_name] = {name: union for name, (union, _) in combined.items()}
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            raise
        finally:
            self._prescribed_indices.pop(adapter_name)
        for name, layer in layers:
            assign_full_(layer.delta_values[adapter_name], combined[name][1])

    # --- selection steps ---------------------------------------------------------------------

    def sparse_delta_layers(self) -> Iterator[tuple[str, SparseDeltaLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, SparseDeltaLayer):
                yield name, module

    def open_selection_window(self, adapter_name: str) -> None:
        """Start gathering growth statistics in backward for the next ``reselect``."""
        config = self.peft_config[adapter_name]
        window = {}
        for name, layer in self.sparse_delta_layers():
            if adapter_name not in layer.delta_values:
                continue
            statistics = self._growth_statistics(config, layer, adapter_name)
            if statistics is None:
                continue
            window[name] = statistics
            layer.gradient_observers[adapter_name] = statistics.observe
        self._window_statistics[adapter_name] = window

    def selection_window_open(self, adapter_name: str) -> bool:
        return adapter_name in self._window_statistics

    def synchronize_selection_statistics(self, adapter_name: str) -> None:
        """Average the open window's statistics over processes (DDP), so every rank holds the same.

        Sums over the window stay exact: every rank continues from the average, and the
        average is taken again before choosing. A no-op in a single process.
        """
        window = self._window_statistics.get(adapter_name, {})
        all_reduce_mean_([tensor for statistics in window.values() for tensor in statistics.process_sums()])

    def selection_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The open window's statistics as flat tensors ``{"<layer>.<name>": tensor}`` (for checkpoints)."""
        window = self._window_statistics.get(adapter_name, {})
        return {
            f"{layer_name}.{key}": tensor
            for layer_name, statistics in window.items()
            for key, tensor in statistics.state_dict().items()
        }

    def load_selection_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Re-open the selection window with statistics from ``selection_state`` (resuming from a checkpoint)."""
        self.open_selection_window(adapter_name)
        per_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            layer_name, name = key.rsplit(".", 1)
            per_layer.setdefault(layer_name, {})[name] = tensor
        window = self._window_statistics[adapter_name]
        unknown = sorted(set(per_layer) - set(window))
        if unknown:
            raise ValueError(f"selection statistics for layers this adapter does not have: {unknown[:3]}")
        for layer_name, statistics in window.items():
            statistics.load_state_dict(per_layer.get(layer_name, {}))

    def _replacement(
        self,
        config,
        name: str,
        layer: SparseDeltaLayer,
        adapter_name: str,
        reselection_rate: float,
        statistics: Optional[GrowthStatistics],
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(drop_positions, grown_indices)`` for one layer at a selection step, or None to keep it.

        Default (prune/regrow): drop the smallest ``|values|``, grow by the window's statistics.
        """
        values = layer.delta_values[adapter_name]
        count = round(reselection_rate * values.numel())
        if statistics is None or count == 0:
            return None
        grown = statistics.grow(count)
        return smallest_magnitude_positions(full_tensor(values), grown.numel()), grown

    def reselect(
        self, adapter_name: str, reselection_rate: float, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> dict[str, float]:
        """Replace up to ``reselection_rate`` of each layer's entries (which ones: ``_replacement``).

        The optimizer's per-entry state follows the kept entries; grown entries start at zero.
        Returns ``{"density": ..., "churn": ...}`` over all layers of the adapter, and the same per
        layer as ``"density/<layer>"`` and ``"churn/<layer>"``.
        """
        config = self.peft_config[adapter_name]
        self.synchronize_selection_statistics(adapter_name)
        window = self._window_statistics.pop(adapter_name, {})
        total_values = total_entries = total_replaced = 0
        per_layer = {}
        for name, layer in self.sparse_delta_layers():
            if adapter_name not in layer.delta_values:
                continue
            layer.gradient_observers.pop(adapter_name, None)
            values = layer.delta_values[adapter_name]
            total_values += values.numel()
            total_entries += layer.num_entries
            replacement = self._replacement(config, name, layer, adapter_name, reselection_rate, window.get(name))
            replaced = 0
            if replacement is not None:
                dropped, grown = replacement
                source_positions = layer.replace_indices(adapter_name, dropped, grown)
                if optimizer is not None:
                    remap_optimizer_state(optimizer, values, source_positions)
                replaced = grown.numel()
            total_replaced += replaced
            per_layer[f"density/{name}"] = values.numel() / layer.num_entries
            per_layer[f"churn/{name}"] = replaced / values.numel()
        return {
            "density": total_values / max(total_entries, 1),
            "churn": total_replaced / max(total_values, 1),
            **per_layer,
        }

    # --- saving and loading ------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's tensors in the compact layout (format 2): index gaps, values in ``config.save_dtype``."""
        tensors = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layer_cls = cls.delta_layer_cls
        return compact_tensors(
            tensors, layer_cls.adapter_layer_names[0], layer_cls.other_param_names[0], config.saved_values_dtype
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # format 2 saves index gaps, format 1 the indices: both are checked as format 1
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, expand_tensors(state_dict))

    @classmethod
    def _check_checkpoint(cls, model, config, adapter_name, state_dict) -> None:
        """Every layer's indices must be a sorted, duplicate-free set inside its weight, and its values floating point.

        Shapes are checked already. Indices and values are cast to the dtypes of the layer's own.
        """
        for name, module in model.named_modules():
            if not isinstance(module, SparseDeltaLayer) or adapter_name not in module.delta_values:
                continue
            indices_key = f"{name}.{module.other_param_names[0]}.{adapter_name}"
            indices = state_dict[indices_key]
            check_index_set(indices, module.num_entries, where=f"layer '{name}'")
            state_dict[indices_key] = indices.to(module.delta_indices[adapter_name].dtype)
            values_key = f"{name}.{module.adapter_layer_names[0]}.{adapter_name}"
            values = state_dict[values_key]
            if not values.is_floating_point():
                raise ValueError(
                    f"layer '{name}': values must be a floating-point tensor, got {values.dtype}; the adapter file "
                    "is damaged or was not written by peft_sparse"
                )
            state_dict[values_key] = values.to(module.delta_values[adapter_name].dtype)
