"""TrainerCallback that runs the selection schedule of sparse-delta adapters (SparseConfig prune/regrow, LiftConfig mask refresh)."""

from __future__ import annotations

import torch
from torch import nn

from peft_sparse.sparse.tuner import SparseDeltaTuner

from .checkpoint_state import CheckpointStateCallback, open_window_state, restore_open_windows
from .model_check import active_adapters_of, check_model_has_method
from .reporting import LoggingCallback
from .schedules import reselection_rate

FROZEN_SLOTS = "frozen_slots"  # checkpoint key part of SaRA/HFT frozen slots (not a layer name: it has no dots)


class SparseUpdateCallback(LoggingCallback, CheckpointStateCallback):
    """Drives selection steps: opens the statistics window ``selection_accumulation_steps`` before
    every ``reselection_steps``-th optimizer step, then drops/grows entries and remaps the optimizer state.
    For LIFT adapters with ``mask_update_interval`` it recomputes the principal-weight mask at those steps.
    For SparseConfig ``selection="sara"``/``"hft"`` it chooses the frozen slots at train begin and every
    ``reselection_steps`` steps (kept in checkpoints), and before each optimizer step it adds the gradient
    of the nuclear-norm penalty (``nuclear_norm_weight``) of one layer. For ``selection="id3"`` it
    gathers D3 statistics in the backward of every unmasking step and unmasks before its optimizer step.

    Every Trainer log gets ``sparse/density`` (trainable entries over all entries of the adapted
    matrices) and ``sparse/churn``: the fraction of entries the selection steps since the previous
    log replaced (summed over those steps; 0 when none ran). With ``log_layer_metrics`` it also gets
    ``sparse/density/<layer>`` and ``sparse/churn/<layer>`` (``sparse/<adapter>/...`` for adapters
    other than "default"). Under DDP every rank selects the same entries; a statistics window open at
    a checkpoint is saved with it (``sparse_update_state.safetensors``) and resumed exactly, and so is
    the churn not logged yet.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[SparseUpdateCallback()])  # doctest: +SKIP
    """

    state_file_name = "sparse_update_state.safetensors"

    def __init__(self, log_layer_metrics: bool = False) -> None:
        self.log_layer_metrics = log_layer_metrics
        self._churn_since_log: dict[str, float] = {}

    def constructor_args(self) -> dict:
        return {"log_layer_metrics": self.log_layer_metrics}

    def _active_adapters(self, model: nn.Module):
        return active_adapters_of(model, SparseDeltaTuner)

    def _dynamic_adapters(self, model: nn.Module):
        for tuner, adapter_name, config in self._active_adapters(model):
            if getattr(config, "updates_indices", False):
                yield tuner, adapter_name, config

    def _maybe_open_window(self, tuner, adapter_name, config, step: int, max_steps: int) -> None:
        if config.selection_accumulation_steps == 0:  # selection from the weights alone (LIFT refresh)
            return
        window_end = step + config.selection_accumulation_steps
        if window_end % config.reselection_steps == 0 and window_end <= max_steps:
            if not tuner.selection_window_open(adapter_name):  # a resumed window is already open
                tuner.open_selection_window(adapter_name)

    def _slot_freezing_adapters(self, model: nn.Module):
        for tuner, adapter_name, config in self._active_adapters(model):
            if getattr(config, "freezes_slots", False):
                yield tuner, adapter_name, config

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_model_has_method(self, model, any(self._active_adapters(model)), "SparseConfig and LiftConfig")
        self._resumed_frozen_slots: set[str] = set()
        super().on_train_begin(args, state, control, model=model, **kwargs)  # resumes saved windows
        for tuner, adapter_name, config in self._dynamic_adapters(model):
            self._maybe_open_window(tuner, adapter_name, config, state.global_step, state.max_steps)
        for tuner, adapter_name, config in self._slot_freezing_adapters(model):
            if adapter_name not in self._resumed_frozen_slots:
                tuner.update_frozen_slots(adapter_name, state.global_step)
        self._maybe_open_unmasking_windows(model, state.global_step + 1, state.max_steps)

    def _maybe_open_unmasking_windows(self, model: nn.Module, next_step: int, max_steps: int) -> None:
        for tuner, adapter_name, config in self._active_adapters(model):
            if not getattr(config, "unmasks_incrementally", False) or tuner.selection_window_open(adapter_name):
                continue
            if tuner.unmasking_due(adapter_name, next_step, max_steps):
                tuner.open_selection_window(adapter_name)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        for tuner, adapter_name, config in self._active_adapters(model):
            if getattr(config, "unmasks_incrementally", False) and tuner.selection_window_open(adapter_name):
                tuner.unmask(adapter_name, state.global_step + 1, state.max_steps, optimizer)
            if getattr(config, "nuclear_norm_weight", 0):
                tuner.add_nuclear_norm_gradient(adapter_name, state.global_step)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        for tuner, adapter_name, config in self._dynamic_adapters(model):
            if step % config.reselection_steps == 0:
                statistics = None
                if config.selection_accumulation_steps == 0:
                    statistics = tuner.reselect(adapter_name, 1.0, optimizer)
                elif tuner.selection_window_open(adapter_name):
                    rate = reselection_rate(
                        config.initial_reselection_rate, config.reselection_rate_schedule, step, state.max_steps
                    )
                    statistics = tuner.reselect(adapter_name, rate, optimizer)
                if statistics is not None:
                    self._queue_logs(adapter_name, statistics)
            self._maybe_open_window(tuner, adapter_name, config, step, state.max_steps)
        for tuner, adapter_name, config in self._slot_freezing_adapters(model):
            if step % config.reselection_steps == 0:
                tuner.update_frozen_slots(adapter_name, step)
        self._maybe_open_unmasking_windows(model, step + 1, state.max_steps)

    def _queue_logs(self, adapter_name: str, statistics: dict[str, float]) -> None:
        prefix = "sparse" if adapter_name == "default" else f"sparse/{adapter_name}"
        for key, value in statistics.items():
            if key == "churn" or (self.log_layer_metrics and key.startswith("churn/")):  # per layer: churn/<layer>
                name = f"{prefix}/{key}"
                self._churn_since_log[name] = self._churn_since_log.get(name, 0.0) + value

    def metrics(self, model):
        values = {}
        for tuner, adapter_name, _ in self._active_adapters(model):
            prefix = "sparse" if adapter_name == "default" else f"sparse/{adapter_name}"
            layers = {name: layer for name, layer in tuner.sparse_delta_layers() if adapter_name in layer.delta_values}
            kept = {name: layer.delta_values[adapter_name].numel() for name, layer in layers.items()}
            entries = {name: layer.num_entries for name, layer in layers.items()}
            values[f"{prefix}/density"] = sum(kept.values()) / max(sum(entries.values()), 1)
            values[f"{prefix}/churn"] = self._churn_since_log.get(f"{prefix}/churn", 0.0)
            if self.log_layer_metrics:
                for name in layers:
                    values[f"{prefix}/density/{name}"] = kept[name] / entries[name]
                    values[f"{prefix}/churn/{name}"] = self._churn_since_log.get(f"{prefix}/churn/{name}", 0.0)
        self._churn_since_log = {}
        return values

    def checkpoint_state(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        open_windows, tensors = open_window_state(self._dynamic_adapters(model))
        frozen = []
        for tuner, adapter_name, _ in self._slot_freezing_adapters(model):
            frozen.append(adapter_name)
            state = tuner.frozen_slot_state(adapter_name)
            tensors.update({f"{adapter_name}/{FROZEN_SLOTS}/{key}": tensor for key, tensor in state.items()})
        attributes = {"open_windows": open_windows, "churn_since_log": self._churn_since_log, "frozen_slots": frozen}
        return attributes, tensors

    def restore_checkpoint_state(self, model: nn.Module, attributes: dict, tensors: dict[str, torch.Tensor]) -> None:
        self._churn_since_log = dict(attributes.get("churn_since_log", {}))  # absent from older checkpoints
        restore_open_windows(self._dynamic_adapters(model), attributes["open_windows"], tensors)
        for tuner, adapter_name, _ in self._slot_freezing_adapters(model):
            if adapter_name in attributes.get("frozen_slots", []):  # absent from older checkpoints
                prefix = f"{adapter_name}/{FROZEN_SLOTS}/"
                state = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
                tuner.load_frozen_slot_state(adapter_name, state)
                self._resumed_frozen_slots.add(adapter_name)
