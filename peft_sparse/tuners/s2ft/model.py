"""The S2FT tuner: chooses heads and FFN channels per block and wraps their modules in slice layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from ...quantization import weight_matrix_shape
from ...sparse.indices import layer_seed
from ...sparse.layer import SUPPORTED_BASE_LAYERS
from ...sparse.tuner import SparseDeltaTuner
from .calibration import gradient_column_scores
from .config import S2ftConfig
from .layer import COLUMNS, ROWS, QuantizedS2ftLinear, S2ftLinear, SliceDelta, slice_indices, slice_of

LORA_BUDGET_TOLERANCE = 0.05  # lora_rank_budget: |S2FT count / LoRA count - 1| at most this


@dataclass(frozen=True)
class BlockBudget:
    """Heads and channels trained in every block."""

    num_heads: int
    num_channels: int


def lora_trainable_count(model: nn.Module, rank: int) -> int:
    """Trainable weights of ``LoraConfig(r=rank, target_modules="all-linear")`` on ``model``: ``rank * (in + out)``
    for every linear layer but the output head (adapter layers count by their base layer)."""
    output_head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    count = 0
    for name, module in model.named_modules():
        if ".base_layer" in f".{name}":  # counted through its adapter layer
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, SUPPORTED_BASE_LAYERS) and module is not output_head and base is not output_head:
            count += rank * sum(weight_matrix_shape(base))
    return count


class S2ftModel(SparseDeltaTuner):
    """S2FT (structured sparse fine-tuning) on a transformers model; build it with ``get_peft_model``.

    Example:
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.S2ftConfig(lora_rank_budget=16))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """

    prefix: str = "s2ft_"
    delta_layer_cls = S2ftLinear
    quantized_layer_cls = QuantizedS2ftLinear

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._block_budgets: dict[str, BlockBudget] = {}
        self._adding_adapter = adapter_name  # the adapter _create_and_replace is injecting (for _initial_indices)
        # selection="gradient": per adapter, the column scores of each output module once calibrated
        self._gradient_scores: dict[str, dict[str, torch.Tensor]] = {}
        self._awaiting_calibration: set[str] = set()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # --- roles and shapes ---------------------------------------------------------------------

    @staticmethod
    def _role(config: S2ftConfig, module_name: str) -> str:
        def matches(names: list[str]) -> bool:  # a name, or a dotted tail of it (as peft matches target_modules)
            return any(module_name == name or module_name.endswith(f".{name}") for name in names)

        if matches(config.attention_output_modules):
            return "heads"
        if matches(config.ffn_output_modules):
            return "channels"
        return "coupled"

    def _base_of(self, module_name: str) -> nn.Module:
        module = self.model.get_submodule(module_name)
        return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module

    def _logical_shape(self, module_name: str) -> tuple[int, int]:
        """``(out, in)`` of a module's weight, whichever way it is stored."""
        base = self._base_of(module_name)
        rows, cols = weight_matrix_shape(base)
        return (cols, rows) if not isinstance(base, nn.Linear) else (rows, cols)

    def _head_dim(self, config: S2ftConfig) -> int:
        if config.head_dim is not None:
            return config.head_dim
        model_config = getattr(self.model, "config", None)
        head_dim = getattr(model_config, "head_dim", None)
        if head_dim is None and getattr(model_config, "num_attention_heads", None):
            head_dim = model_config.hidden_size // model_config.num_attention_heads
        if not head_dim:
            raise ValueError("head_dim must be given: the model's config has neither head_dim nor num_attention_heads")
        return head_dim

    def _sibling_channel_module(self, config: S2ftConfig, module_name: str) -> str:
        """The FFN output module in the same block as FFN input module ``module_name``."""
        parent = module_name.rpartition(".")[0]
        for name in config.ffn_output_modules:
            leaf = name.rsplit(".", 1)[-1]
            candidate = f"{parent}.{leaf}" if parent else leaf
            try:
                self.model.get_submodule(candidate)
            except AttributeError:
                continue
            return candidate
        raise ValueError(
            f"ffn_input_modules: '{module_name}' has no sibling among ffn_output_modules {config.ffn_output_modules} "
            f"in '{parent}' to take its channels from"
        )

    # --- budget -------------------------------------------------------------------------------

    def _block_budget(self, config: S2ftConfig, adapter_name: str) -> BlockBudget:
        if adapter_name not in self._block_budgets:
            if config.lora_rank_budget is None:
                budget = BlockBudget(config.num_heads, config.num_channels)
            else:
                budget = self._lora_matched_budget(config)
            self._block_budgets[adapter_name] = budget
        return self._block_budgets[adapter_name]

    def _lora_matched_budget(self, config: S2ftConfig) -> BlockBudget:
        """Heads and channels per block whose total is LoRA's count at ``lora_rank_budget`` (within 5%).

        The count is split over heads and channels in proportion to the sizes of their matrices; heads
        are rounded first, then channels absorb the rest.
        """
        target = lora_trainable_count(self.model, config.lora_rank_budget)
        roles: dict[str, list[tuple[int, int]]] = {"heads": [], "channels": [], "coupled": []}
        for name in self._matched_weight_sizes(config):
            roles[self._role(config, name)].append(self._logical_shape(name))
        head_dim = self._head_dim(config) if roles["heads"] else 1
        per_head = sum(out * head_dim for out, _ in roles["heads"])  # one head in every attention output module
        per_channel = sum(out for out, _ in roles["channels"]) + sum(inputs for _, inputs in roles["coupled"])
        head_size = sum(out * inputs for out, inputs in roles["heads"])
        channel_size = sum(out * inputs for out, inputs in roles["channels"] + roles["coupled"])
        max_heads = min((inputs // head_dim for _, inputs in roles["heads"]), default=0)
        max_channels = min((inputs for _, inputs in roles["channels"]), default=0)
        num_heads = num_channels = 0
        if per_head:
            share = target * head_size / (head_size + channel_size)
            num_heads = min(max_heads, round(share / per_head))
        if per_channel:
            num_channels = min(max_channels, max(0, round((target - num_heads * per_head) / per_channel)))
        count = num_heads * per_head + num_channels * per_channel
        if abs(count / target - 1) > LORA_BUDGET_TOLERANCE:
            raise ValueError(
                f"lora_rank_budget={config.lora_rank_budget} asks for {target:,} trainable weights, but whole heads "
                f"({per_head:,} weights each) and channels ({per_channel:,} each) of the target modules give at best "
                f"{count:,}; give num_heads/num_channels instead"
            )
        return BlockBudget(num_heads, num_channels)

    def _num_values(self, config: S2ftConfig, adapter_name: str, module_name: str, num_entries: int) -> int:
        budget = self._block_budget(config, adapter_name)
        out, inputs = self._logical_shape(module_name)
        role = self._role(config, module_name)
        if role == "heads":
            return budget.num_heads * self._head_dim(config) * out
        return budget.num_channels * (out if role == "channels" else inputs)

    # --- selection ----------------------------------------------------------------------------

    def _selected_groups(self, config: S2ftConfig, module_name: str, count: int, group_size: int) -> torch.Tensor:
        """Sorted ids [count] of the chosen heads (``group_size=head_dim``) or channels (1) of an output module."""
        out, inputs = self._logical_shape(module_name)
        num_groups = inputs // group_size
        if count > num_groups:
            noun = "num_heads" if group_size > 1 else "num_channels"
            raise ValueError(f"{noun} must be at most the {num_groups} of module '{module_name}', got {count}")
        if config.selection == "weight_norm":
            weight = self._base_weight(module_name, self._base_of(module_name)).float()
            if not isinstance(self._base_of(module_name), nn.Linear):
                weight = weight.t()  # [out, in]
            column_scores = weight.square().sum(0)
        else:  # the calibrated scores of "gradient"; None for "random"
            column_scores = self._gradient_scores.get(self._adding_adapter, {}).get(module_name)
        if column_scores is None:  # "random", or "gradient" before its calibration (a placeholder)
            # seeded by the block, so FFN input modules pick the channels of their output module
            generator = torch.Generator().manual_seed(layer_seed(config.init_seed, module_name))
            chosen = torch.randperm(num_groups, generator=generator)[:count]
        else:
            chosen = torch.topk(column_scores.cpu().view(num_groups, group_size).sum(1), count).indices
        return chosen.sort().values

    def _initial_indices(self, config: S2ftConfig, base_layer: nn.Module, count: int, module_name: str):
        role = self._role(config, module_name)
        budget = self._block_budget(config, self._adding_adapter)
        if role == "heads":
            head_dim = self._head_dim(config)
            _, inputs = self._logical_shape(module_name)
            if inputs % head_dim:
                raise ValueError(
                    f"head_dim must divide the {inputs} inputs of attention output module '{module_name}', "
                    f"got head_dim={head_dim}"
                )
            heads = self._selected_groups(config, module_name, budget.num_heads, head_dim)
            positions = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
        elif role == "channels":
            positions = self._selected_groups(config, module_name, budget.num_channels, 1)
        else:
            sibling = self._sibling_channel_module(config, module_name)
            positions = self._selected_groups(config, sibling, budget.num_channels, 1)
        # logical input columns are stored columns of a Linear weight, stored rows of a Conv1D weight
        selects_inputs = role != "coupled"
        axis = COLUMNS if selects_inputs == isinstance(base_layer, nn.Linear) else ROWS
        return slice_indices(axis, positions, weight_matrix_shape(base_layer))

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        self._adding_adapter = adapter_name
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, SUPPORTED_BASE_LAYERS) and self._num_values(config, adapter_name, current_key, 0) == 0:
            return  # num_heads=0 or num_channels=0: this module has nothing to train
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **kwargs)
        # a checkpoint load brings its own indices (PeftSparseConfig.from_pretrained sets _awaits_checkpoint)
        if config.selection == "gradient" and not (config.inference_mode or config.__dict__.get("_awaits_checkpoint")):
            if not self._awaiting_calibration:  # on the wrapped model: PeftModel without a task type calls it directly
                self.model.register_forward_pre_hook(self._refuse_training_before_selection)
            self._awaiting_calibration.add(adapter_name)

    # --- gradient selection -------------------------------------------------------------------

    def select_by_gradient(self, batches, adapter_name: str = "default") -> None:
        """Choose the heads/channels of ``selection="gradient"`` from a calibration pass over ``batches``.

        ``batches``: model inputs with labels (e.g. a few batches of the Trainer's data loader). Each
        output module keeps the heads/channels whose columns of the weight gradient have the largest
        summed squared norm; FFN input modules follow their block's channels. Call it before training.

        Example:
            >>> model = get_peft_model(base, S2ftConfig(lora_rank_budget=16, selection="gradient"))  # doctest: +SKIP
            >>> model.base_model.select_by_gradient(batch for _, batch in zip(range(8), loader))  # doctest: +SKIP
        """
        config = self.peft_config[adapter_name]
        if config.selection != "gradient":
            raise ValueError(f"select_by_gradient needs S2ftConfig(selection='gradient'), got {config.selection!r}")
        layers = {name: layer for name, layer in self.sparse_delta_layers() if adapter_name in layer.delta_values}
        if any(bool(layer.delta_values[adapter_name].detach().any()) for layer in layers.values()):
            raise ValueError(f"select_by_gradient chooses before training: adapter '{adapter_name}' has trained values")
        scored = {name: layer for name, layer in layers.items() if self._role(config, name) != "coupled"}
        self._awaiting_calibration.discard(adapter_name)  # its own forwards train nothing
        try:
            self._gradient_scores[adapter_name] = gradient_column_scores(self.model, scored, batches)
        except Exception:
            self._awaiting_calibration.add(adapter_name)
            raise
        self._adding_adapter = adapter_name
        for name, layer in layers.items():
            count = layer.num_values(adapter_name)
            chosen = self._initial_indices(config, layer.get_base_layer(), count, name)
            layer.replace_indices(adapter_name, torch.arange(count), chosen.to(layer.delta_indices[adapter_name]))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._awaiting_calibration.discard(adapter_name)
        self._gradient_scores.pop(adapter_name, None)

    def _refuse_training_before_selection(self, model: nn.Module, args: tuple) -> None:
        waiting = sorted(self._awaiting_calibration & set(self.active_adapters))
        if waiting and model.training and torch.is_grad_enabled():
            raise ValueError(
                f"S2FT adapter(s) {waiting} have selection='gradient' and no selection yet: call "
                "model.base_model.select_by_gradient(batches) before training"
            )

    # --- loading checks -----------------------------------------------------------------------

    @classmethod
    def _check_checkpoint(cls, model, config, adapter_name, state_dict) -> None:
        """Besides the sparse-delta checks, every layer's indices must be whole rows or columns of its weight."""
        super()._check_checkpoint(model, config, adapter_name, state_dict)
        for name, module in model.named_modules():
            if isinstance(module, SliceDelta) and adapter_name in module.delta_values:
                indices = state_dict[f"{name}.{module.other_param_names[0]}.{adapter_name}"]
                slice_of(indices, module.weight_shape, f"layer '{name}'")
