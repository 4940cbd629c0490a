"""TrainerCallback that runs RoSA's mask schedule: LoRA warmup, gradient window, then the fixed sparse mask."""

from __future__ import annotations

import torch
from torch import nn

from peft_sparse.tuners.rosa import RosaModel

from .checkpoint_state import CheckpointStateCallback, open_window_state, restore_open_windows
from .model_check import active_adapters_of, check_model_has_method
from .reporting import LoggingCallback


class RosaCallback(LoggingCallback, CheckpointStateCallback):
    """Drives ``RosaConfig(mask_rule="gradient")`` adapters (RoSA's ``RosaScheduler``).

    Optimizer steps ``1..mask_warmup_steps`` train the LoRA part alone; the next
    ``mask_accumulation_steps`` steps still train it alone while every micro-batch's dense weight
    gradient is accumulated; after that last step each layer's sparse mask becomes the top-k of the
    statistic, fixed for the rest of training, and both parts train. Under DDP every rank chooses the
    same mask (the statistics are averaged first); an open window is saved with each checkpoint
    (``rosa_mask_state.safetensors``) and resumed exactly. Logs ``rosa/mask_chosen`` (0 or 1).
    ``mask_rule="magnitude"`` adapters need no callback (their mask is chosen at injection).

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[RosaCallback()])  # doctest: +SKIP
    """

    state_file_name = "rosa_mask_state.safetensors"

    def _gradient_rule_adapters(self, model: nn.Module):
        for tuner, adapter_name, config in active_adapters_of(model, RosaModel):
            if config.mask_rule == "gradient":
                yield tuner, adapter_name, config

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_model_has_method(self, model, any(active_adapters_of(model, RosaModel)), "RosaConfig")
        for tuner, adapter_name, config in self._gradient_rule_adapters(model):
            if config.mask_step > state.max_steps:
                raise ValueError(
                    f"mask_warmup_steps + mask_accumulation_steps ({config.mask_step}) must be at most the run's "
                    f"max_steps ({state.max_steps}), or the sparse part of adapter '{adapter_name}' never trains; "
                    "lower them, or use mask_rule='magnitude'"
                )
            if state.global_step < config.mask_step:
                tuner.hold_back_sparse_part(adapter_name)
        super().on_train_begin(args, state, control, model=model, **kwargs)  # resumes an open window
        self._open_due_windows(model, state.global_step)

    def _open_due_windows(self, model: nn.Module, step: int) -> None:
        for tuner, adapter_name, config in self._gradient_rule_adapters(model):
            window_due = config.mask_warmup_steps <= step < config.mask_step
            if window_due and not tuner.selection_window_open(adapter_name):
                tuner.open_selection_window(adapter_name)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        for tuner, adapter_name, config in self._gradient_rule_adapters(model):
            if state.global_step == config.mask_step and tuner.sparse_part_held_back(adapter_name):
                tuner.choose_gradient_mask(adapter_name, optimizer)
        self._open_due_windows(model, state.global_step)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        values = {}
        for tuner, adapter_name, _ in self._gradient_rule_adapters(model):
            prefix = "rosa" if adapter_name == "default" else f"rosa/{adapter_name}"
            values[f"{prefix}/mask_chosen"] = float(not tuner.sparse_part_held_back(adapter_name))
        return values

    def checkpoint_state(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        open_windows, tensors = open_window_state(self._gradient_rule_adapters(model))
        return {"open_windows": open_windows}, tensors

    def restore_checkpoint_state(self, model: nn.Module, attributes: dict, tensors: dict[str, torch.Tensor]) -> None:
        restore_open_windows(self._gradient_rule_adapters(model), attributes["open_windows"], tensors)
