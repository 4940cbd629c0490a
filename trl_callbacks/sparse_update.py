"""TrainerCallback that runs the selection schedule of sparse-delta adapters (SparseConfig prune/regrow, LiftConfig mask refresh)."""

from __future__ import annotations

from typing import Iterator

from torch import nn
from transformers import TrainerCallback

from peft_sparse.sparse.tuner import SparseDeltaTuner

from .schedules import reselection_rate


def sparse_delta_tuners(model: nn.Module) -> Iterator[SparseDeltaTuner]:
    """Every sparse-delta tuner inside ``model`` (a PeftModel, possibly wrapped by DDP)."""
    for module in model.modules():
        if isinstance(module, SparseDeltaTuner):
            yield module


class SparseUpdateCallback(TrainerCallback):
    """Drives selection steps: opens the statistics window ``selection_accumulation_steps`` before
    every ``reselection_steps``-th optimizer step, then drops/grows entries and remaps the optimizer state.
    For LIFT adapters with ``mask_update_interval`` it recomputes the principal-weight mask at those steps.

    Density and churn (fraction of entries replaced) go into the next Trainer log as
    ``sparse/density`` and ``sparse/churn`` (``sparse/<adapter>/...`` for other adapters than "default").

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[SparseUpdateCallback()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._pending_logs: dict[str, float] = {}

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
            tuner.open_selection_window(adapter_name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
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
                    prefix = "sparse" if adapter_name == "default" else f"sparse/{adapter_name}"
                    self._pending_logs.update({f"{prefix}/{key}": value for key, value in statistics.items()})
            self._maybe_open_window(tuner, adapter_name, config, step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending_logs or logs is None:
            return
        logs.update(self._pending_logs)
        if state.log_history:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}
