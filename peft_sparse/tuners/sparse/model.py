"""The sparse fine-tuning tuner: random initial indices, prune/regrow by AG or MA statistics; SaRA and HFT
keep their indices and freeze some slots instead (:mod:`peft_sparse.sparse.frozen_slots`); ID3 unmasks its
frozen zero slots step by step (:mod:`peft_sparse.sparse.incremental_unmasking`); LT-SFT's indices come
from a dense phase (:mod:`peft_sparse.sparse.lottery_ticket`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...quantization import dequantized_weight, quantization_of, weight_matrix_shape
from ...sparse.distributed import assign_full_, full_tensor, local_part, local_tensor
from ...sparse.frozen_slots import FrozenSlots, random_half, slots_above_threshold
from ...sparse.incremental_unmasking import D3Growth, unmasked_count
from ...sparse.indices import layer_seed, random_unique_indices
from ...sparse.layer import SparseDeltaLayer
from ...sparse.nuclear_norm import nuclear_norm_gradient
from ...sparse.optimizer_state import remap_optimizer_state
from ...sparse.selection import (
    AccumulatedGradientGrowth, GrowthStatistics, MomentumApproximationGrowth, smallest_weight_indices,
)  # fmt: skip
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

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._frozen_slots: dict[str, dict[str, FrozenSlots]] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _initial_indices(self, config: SparseConfig, base_layer: nn.Module, count: int, module_name: str):
        if config.selection == "sara":  # a 4-bit/8-bit weight is dequantized for this choice only
            return smallest_weight_indices(self._base_weight(module_name, base_layer), count)
        if config.selection == "lt-sft" and quantization_of(base_layer) is not None:
            raise ValueError(
                f"selection='lt-sft' trains the target weights densely before choosing its entries, which a "
                f"bitsandbytes {quantization_of(base_layer)} weight cannot do (module '{module_name}'); on a quantized "
                "base use selection='ag' (entries chosen from accumulated gradients, no dense phase)"
            )
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
        if config.selection == "id3":
            values = layer.delta_values[adapter_name]
            masked = next(f for f in self._frozen_slots[adapter_name].values() if f.values is values).positions
            unmasked = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device)
            unmasked[masked] = False
            base = layer.get_base_layer()
            return D3Growth(
                indices[unmasked], layer.weight_shape, lambda: dequantized_weight(base), config.d3_epsilon,
                config.d3_exponent, num_candidates=indices.numel(),
            )  # fmt: skip
        return None

    # --- frozen slots (SaRA, HFT) and SaRA's nuclear-norm penalty ---------------------------------

    def _adapter_layers(self, adapter_name: str) -> list[tuple[str, SparseDeltaLayer]]:
        return [(name, layer) for name, layer in self.sparse_delta_layers() if adapter_name in layer.delta_values]

    def update_frozen_slots(self, adapter_name: str, step: int) -> None:
        """At a selection step (``step`` a multiple of ``reselection_steps``, or 0), choose which slots freeze.

        HFT: a new seeded random half, of each block's matrices (``hft_granularity="matrix"``: the
        matrices sharing a parent module) or of each matrix's slots (``"entry"``); the slots frozen
        before train again. SaRA, at ``step == reselection_steps`` only (its progressive adjustment): the
        slots whose ``|W0 + delta|`` rose above the layer's threshold (the largest selected ``|W0|``) freeze
        for the rest of training; the slots still below it keep training.
        """
        config = self.peft_config[adapter_name]
        layers = self._adapter_layers(adapter_name)
        if config.selection == "hft":
            self._freeze(adapter_name, hft_frozen_positions(config, adapter_name, layers, step))
        elif config.selection == "sara" and step == config.reselection_steps:
            self._freeze(adapter_name, {name: sara_effective_slots(layer, adapter_name) for name, layer in layers})
        elif config.selection == "id3" and adapter_name not in self._frozen_slots:  # ID3 starts all masked
            for _, layer in layers:
                layer.delta_values[adapter_name].data.zero_()
            self._freeze(adapter_name, {name: torch.arange(layer.num_values(adapter_name)) for name, layer in layers})

    def _freeze(self, adapter_name: str, positions: dict[str, torch.Tensor]) -> None:
        self.release_frozen_slots(adapter_name)
        layers = dict(self._adapter_layers(adapter_name))
        self._frozen_slots[adapter_name] = {
            name: FrozenSlots(layers[name].delta_values[adapter_name], layer_positions)
            for name, layer_positions in positions.items()
        }

    def release_frozen_slots(self, adapter_name: str) -> None:
        """Let every slot of the adapter train again."""
        for frozen in self._frozen_slots.pop(adapter_name, {}).values():
            frozen.release()

    def frozen_slot_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{layer name: frozen positions}`` (for checkpoints); empty when nothing is frozen."""
        return {name: frozen.positions for name, frozen in self._frozen_slots.get(adapter_name, {}).items()}

    def load_frozen_slot_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Freeze the slots of ``frozen_slot_state`` at their current values (resuming from a checkpoint)."""
        unknown = sorted(set(state) - {name for name, _ in self._adapter_layers(adapter_name)})
        if unknown:
            raise ValueError(f"frozen slots for layers this adapter does not have: {unknown[:3]}")
        self._freeze(adapter_name, state)

    # --- ID3: incremental unmasking ------------------------------------------------------------

    def unmasking_due(self, adapter_name: str, step: int, max_steps: int) -> bool:
        """Whether optimizer step ``step`` (1-based) unmasks: steps 1, 1 + r, 1 + 2r, ... while slots are masked."""
        config = self.peft_config[adapter_name]
        masked = any(frozen.positions.numel() for frozen in self._frozen_slots.get(adapter_name, {}).values())
        return masked and step <= max_steps and (step - 1) % config.reselection_steps == 0

    @torch.no_grad()
    def unmask(
        self, adapter_name: str, step: int, max_steps: int, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> None:
        """ID3 at optimizer step ``step`` (after backward, before the optimizer step): unmask the best D3 scores.

        Each layer reaches ``unmasked_count(k, step + r - 1, max_steps)`` unmasked slots (r =
        ``reselection_steps``). A chosen entry takes a masked slot (its own, if it has one); the new
        slots get the step's gradient, so the optimizer step that follows trains them already, as the
        reference does. The optimizer state follows the slots; new slots start at zero.
        """
        config = self.peft_config[adapter_name]
        self.synchronize_selection_statistics(adapter_name)
        window = self._window_statistics.pop(adapter_name, {})
        masked_positions = {}
        for name, layer in self._adapter_layers(adapter_name):
            layer.gradient_observers.pop(adapter_name, None)
            values, masked = layer.delta_values[adapter_name], self._frozen_slots[adapter_name][name].positions
            target = unmasked_count(values.numel(), step + config.reselection_steps - 1, max_steps)
            grown, gradient = window[name].grow_with_gradients(max(0, target - (values.numel() - masked.numel())))
            masked_positions[name] = self._unmask_layer(layer, adapter_name, masked, grown, gradient, optimizer)
        self._freeze(adapter_name, masked_positions)

    def _unmask_layer(self, layer, adapter_name, masked, grown, gradient, optimizer) -> torch.Tensor:
        """Give masked slots the ``grown`` indices with their ``gradient``; returns the slots still masked."""
        values, indices = layer.delta_values[adapter_name], layer.delta_indices[adapter_name]
        masked = masked.to(indices.device)
        own = torch.isin(indices[masked], grown)  # chosen entries that a masked slot already holds
        elsewhere = grown[~torch.isin(grown, indices[masked])]
        freed = masked[~own][: elsewhere.numel()]
        if values.grad is None:
            values.grad = torch.zeros_like(values)  # a DTensor's is sharded like it
        old_gradient = full_tensor(values.grad)  # under FSDP2: gathered, the same on every rank
        source_positions = layer.replace_indices(adapter_name, freed, elsewhere)
        if optimizer is not None:
            remap_optimizer_state(optimizer, values, source_positions)
        new_gradient = torch.where(source_positions >= 0, old_gradient[source_positions.clamp(min=0)], 0.0)
        new_gradient[torch.searchsorted(indices.long(), grown.long())] = gradient.to(new_gradient)
        assign_full_(values.grad, new_gradient)
        return torch.nonzero(torch.isin(source_positions, masked[~own][elsewhere.numel() :])).flatten()

    def add_nuclear_norm_gradient(self, adapter_name: str, step: int) -> None:
        """Add ``nuclear_norm_weight * d||delta||_*/d values`` of one layer (layer ``step mod L``, in order) to its gradient.

        Called after backward and before the optimizer step, as SaRA's optimizer does (it penalises one
        random matrix per step; the cyclic order is the same on every DDP rank and after a resume).
        Frozen slots get none.
        """
        weight = self.peft_config[adapter_name].nuclear_norm_weight
        layers = self._adapter_layers(adapter_name)
        if weight == 0 or not layers:
            return
        name, layer = layers[step % len(layers)]
        values = layer.delta_values[adapter_name]
        gradient = weight * nuclear_norm_gradient(layer.get_delta_weight(adapter_name), layer.delta_indices[adapter_name])
        frozen = self._frozen_slots.get(adapter_name, {}).get(name)
        if frozen is not None:
            gradient = frozen.mask_gradient(gradient)
        if values.grad is None:
            values.grad = torch.zeros_like(values)  # a DTensor's is sharded like it
        local_gradient = local_tensor(values.grad)  # under FSDP2: add this rank's part of the whole gradient
        local_gradient.add_(local_part(values, gradient).to(local_gradient))


def hft_frozen_positions(
    config: SparseConfig, adapter_name: str, layers: list[tuple[str, SparseDeltaLayer]], step: int
) -> dict[str, torch.Tensor]:
    """HFT's frozen half at ``step``: ``{layer name: frozen slot positions}``, seeded by ``init_seed``, names and step."""
    if config.hft_granularity == "entry":
        return {
            name: random_half(layer.num_values(adapter_name), layer_seed(config.init_seed, f"{name}.hft.{step}"))
            for name, layer in layers
        }
    blocks: dict[str, list[tuple[str, SparseDeltaLayer]]] = {}
    for name, layer in layers:
        blocks.setdefault(name.rpartition(".")[0], []).append((name, layer))
    positions = {}
    for block, members in blocks.items():
        for member in random_half(len(members), layer_seed(config.init_seed, f"{block}.hft.{step}")).tolist():
            name, layer = members[member]
            positions[name] = torch.arange(layer.num_values(adapter_name))
    return positions


def sara_effective_slots(layer: SparseDeltaLayer, adapter_name: str) -> torch.Tensor:
    """Slots whose ``|W0 + delta|`` rose above the largest ``|W0|`` SaRA selected in this layer (its threshold)."""
    values = full_tensor(layer.delta_values[adapter_name].detach()).float()
    effective = layer.effective_weight(adapter_name).view(-1)[layer.delta_indices[adapter_name].long()]
    threshold = (effective - values).abs().max().item()
    return slots_above_threshold(effective, threshold)
