"""TrainerCallback that runs the selection schedule of sparse-delta adapters (SparseConfig prune/regrow, LiftConfig mask refresh)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from peft_sparse.sparse.distributed import is_fsdp_managed
from peft_sparse.sparse.tuner import SparseDeltaTuner

from .checkpoint_state import CheckpointStateCallback
from .reporting import LoggingCallback
from .schedules import reselection_rate


def sparse_delta_tuners(model: nn.Module) -> Iterator[SparseDeltaTuner]:
    """Every sparse-delta tuner inside ``model`` (a PeftModel, possibly wrapped by DDP)."""
    for module in model.modules():
        if isinstance(module, SparseDeltaTuner):
            yield module


class SparseUpdateCallback(LoggingCallback, CheckpointStateCallback):
    """Drives selection steps: opens the statistics window ``selection_accumulation_steps`` before
    every ``reselection_steps``-th optimizer step, then drops/grows entries and remaps the optimizer state.
    For LIFT adapters with ``mask_update_interval`` it recomputes the principal-weight mask at those steps.

    After each selection step the next Trainer log (and so TensorBoard / W&B) gets ``sparse/density``
    and ``sparse/churn`` (fraction of entries replaced) and, with ``log_layer_metrics``,
    ``sparse/density/<layer>`` and ``sparse/churn/<layer>`` (``sparse/<adapter>/...`` for adapters
    other than "default"). Under DDP every rank selects the same entries; a statistics window open at
    a checkpoint is saved with it (``sparse_update_state.safetensors``) and resumed exactly.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[SparseUpdateCallback()])  # doctest: +SKIP
    """

    state_file_name = "sparse_update_state.safetensors"

    def __init__(self, log_layer_metrics: bool = True) -> None:
        self.log_layer_metrics = log_layer_metrics
        self._pending_logs: dict[str, float] = {}

    def constructor_args(self) -> dict:
        return {"log_layer_metrics": self.log_layer_metrics}

    def _dynamic_adapters(self, model: nn.Module):
        for tuner in sparse_delta_tuners(model):
            for adapter_name, config in tuner.peft_config.items():
                if getattr(config, "updates_indices", False) and adapter_name in tuner.active_adapters:
                    yield tuner, adapter_name, config

    def _maybe_open_window(self, tuner, adapter_name, config, step: int, max_steps: int) -> None:
        if config.selection_accumulation_steps == 0:  # selection from the weights alone (LIFT refresh)
            return
        window_end = step + config.selection_accumulation_steps
        if window_end % config.reselection_steps == 0 and window_end <= max_steps:
            if not tuner.selection_window_open(adapter_name):  # a resumed window is already open
                tuner.open_selection_window(adapter_name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if is_fsdp_managed(model):
            raise ValueError(
                "sparse-delta adapters (SparseConfig, LiftConfig) do not support FSDP: their delta is merged "
                "into the frozen weight, which FSDP shards and re-gathers; train them with DDP instead"
            )
        super().on_train_begin(args, state, control, model=model, **kwargs)  # resumes saved windows
        for tuner, adapter_name, config in self._dynamic_adapters(model):
            self._maybe_open_window(tuner, adapter_name, config, state.global_step, state.max_steps)

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

    def _queue_logs(self, adapter_name: str, statistics: dict[str, float]) -> None:
        prefix = "sparse" if adapter_name == "default" else f"sparse/{adapter_name}"
        for key, value in statistics.items():
            if self.log_layer_metrics or "/" not in key:  # per-layer keys are "<name>/<layer>"
                self._pending_logs[f"{prefix}/{key}"] = value

    def metrics(self, model):
        pending, self._pending_logs = self._pending_logs, {}
        return pending

    def checkpoint_state(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        open_windows, tensors = [], {}
        for tuner, adapter_name, _ in self._dynamic_adapters(model):
            if tuner.selection_window_open(adapter_name):
                tuner.synchronize_selection_statistics(adapter_name)  # the same on every rank from here on
                open_windows.append(adapter_name)
                state = tuner.selection_state(adapter_name)
                tensors.update({f"{adapter_name}/{key}": tensor for key, tensor in state.items()})
        return {"open_windows": open_windows, "pending_logs": self._pending_logs}, tensors

    def restore_checkpoint_state(self, model: nn.Module, attributes: dict, tensors: dict[str, torch.Tensor]) -> None:
        self._pending_logs = dict(attributes["pending_logs"])
        for tuner, adapter_name, _ in self._dynamic_adapters(model):
            if adapter_name in attributes["open_windows"]:
                prefix = f"{adapter_name}/"
                state = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
                tuner.load_selection_state(adapter_name, state)
