"""TrainerCallback that drives SNELLA's per-layer sparsity allocation (SnellConfig(allocation="snella"))."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from peft_sparse.tuners.snell import SnellConfig, SnellModel
from peft_sparse.tuners.snell.model import snell_tuners

from .checkpoint_state import CheckpointStateCallback
from .model_check import check_model_has_method
from .reporting import LoggingCallback


def snella_adapters(model: nn.Module) -> Iterator[tuple[SnellModel, str, SnellConfig]]:
    """(tuner, adapter name, config) of every active adapter with ``allocation="snella"`` inside ``model``."""
    for tuner in snell_tuners(model):
        for adapter_name, config in tuner.peft_config.items():
            if config.allocation == "snella" and adapter_name in tuner.active_adapters:
                yield tuner, adapter_name, config


class SnellAllocationCallback(LoggingCallback, CheckpointStateCallback):
    """Runs SNELLA inside the Trainer (and TRL's SFTTrainer); all budget math lives in ``SnellModel``.

    - At train begin: checks that the model has an adapter with ``allocation="snella"``.
    - Before each optimizer step (gradients present, after clipping): updates the importance EMAs.
    - After every ``allocation_interval``-th optimizer step: re-splits the scheduled budget.
    - Logs the current ``snella/budget`` (kept entries, summed over
      layers), ``snella/mean_sparsity`` (over all entries) and, with ``log_layer_sparsity``,
      ``snella/sparsity/<layer>`` (``snella/<adapter>/...`` for adapters other than "default").
    - Saves the importance EMAs with every checkpoint (``snella_state.safetensors``), so a resumed
      run allocates as an uninterrupted one (the budgets themselves are saved with the adapter).

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[SnellAllocationCallback()])  # doctest: +SKIP
    """

    state_file_name = "snella_state.safetensors"

    def __init__(self, log_layer_sparsity: bool = False) -> None:
        self.log_layer_sparsity = log_layer_sparsity

    def constructor_args(self) -> dict:
        return {"log_layer_sparsity": self.log_layer_sparsity}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_model_has_method(self, model, any(snella_adapters(model)), 'SnellConfig(allocation="snella")')
        return super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for tuner, adapter_name, _ in snella_adapters(model):
            tuner.update_importance(adapter_name)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for tuner, adapter_name, config in snella_adapters(model):
            if state.global_step % config.allocation_interval == 0:
                tuner.allocate(adapter_name, state.global_step, state.max_steps)

    def metrics(self, model):
        values = {}
        for tuner, adapter_name, _ in snella_adapters(model):
            prefix = "snella" if adapter_name == "default" else f"snella/{adapter_name}"
            layers = dict(tuner.snell_layers(adapter_name))
            kept = sum(layer.num_kept(adapter_name) for layer in layers.values())
            values[f"{prefix}/budget"] = kept
            values[f"{prefix}/mean_sparsity"] = 1 - kept / sum(layer.num_entries for layer in layers.values())
            if self.log_layer_sparsity:
                for name, layer in layers.items():
                    values[f"{prefix}/sparsity/{name}"] = layer.sparsity(adapter_name)
        return values

    def checkpoint_state(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {}
        for tuner, adapter_name, _ in snella_adapters(model):
            tensors.update({f"{adapter_name}/{key}": t for key, t in tuner.importance_state(adapter_name).items()})
        return {}, tensors

    def restore_checkpoint_state(self, model: nn.Module, attributes: dict, tensors: dict[str, torch.Tensor]) -> None:
        for tuner, adapter_name, _ in snella_adapters(model):
            prefix = f"{adapter_name}/"
            state = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
            tuner.load_importance_state(adapter_name, state)
