"""Callback state that survives ``Trainer.train(resume_from_checkpoint=...)``, tensors included.

``trainer_state.json`` (transformers' ``ExportableState``) holds small JSON state only, and is
restored only with ``restore_callback_states_from_checkpoint=True``. So a ``CheckpointStateCallback``
writes its state (tensors plus JSON attributes in the file's metadata) to its own safetensors file in
each checkpoint folder at ``on_save`` (main process only: the state is the same on every rank by
then), records in ``trainer_state.json`` that the file exists, and reads it back at ``on_train_begin``
of a resumed run. The Trainer does not tell callbacks which folder it resumed from: it is
``args.resume_from_checkpoint`` when set, else ``<output_dir>/checkpoint-<global step>`` (where
``resume_from_checkpoint=True`` looks); the file records its step, which must match.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class CheckpointStateCallback(TrainerCallback, ExportableState):
    """Base class: ``checkpoint_state``/``restore_checkpoint_state`` travel with every Trainer checkpoint.

    Subclasses set ``state_file_name`` and implement the two methods (and ``constructor_args`` when
    their ``__init__`` takes arguments, for ``restore_callback_states_from_checkpoint``).

    Example:
        >>> class RunningSum(CheckpointStateCallback):
        ...     state_file_name = "running_sum.safetensors"
        ...     def __init__(self):
        ...         self.total = torch.zeros(3)
        ...     def checkpoint_state(self, model):
        ...         return {"note": "any JSON"}, {"total": self.total}
        ...     def restore_checkpoint_state(self, model, attributes, tensors):
        ...         self.total = tensors["total"]
    """

    state_file_name: str = ""

    def constructor_args(self) -> dict:
        return {}

    def checkpoint_state(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(JSON-able attributes, tensors)`` to save; called on every rank (may use collectives)."""
        raise NotImplementedError

    def restore_checkpoint_state(self, model: nn.Module, attributes: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``checkpoint_state`` returned (tensors on the model's device)."""
        raise NotImplementedError

    def state(self) -> dict:
        return {"args": self.constructor_args(), "attributes": {}, "state_file": self.state_file_name}

    def on_save(self, args, state, control, model=None, **kwargs):
        attributes, tensors = self.checkpoint_state(model)
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        metadata = {"global_step": str(state.global_step), "attributes": json.dumps(attributes)}
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
        save_file(tensors, os.path.join(folder, self.state_file_name), metadata=metadata)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0 and type(self).__name__ in state.stateful_callbacks:
            self._restore(args, state, model)
        return super().on_train_begin(args, state, control, model=model, **kwargs)

    def _restore(self, args, state, model: nn.Module) -> None:
        path = self._state_file_of_resumed_checkpoint(args, state.global_step)
        device = next(model.parameters()).device
        with safe_open(path, framework="pt", device=str(device)) as file:
            attributes = json.loads(file.metadata()["attributes"])
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        self.restore_checkpoint_state(model, attributes, tensors)

    def _state_file_of_resumed_checkpoint(self, args, global_step: int) -> str:
        folders = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, self.state_file_name)
            if os.path.isfile(path) and _saved_step(path) == global_step:
                return path
        raise FileNotFoundError(
            f"resuming at step {global_step}: {type(self).__name__} saved its state in '{self.state_file_name}' "
            f"next to the checkpoint, but no such file for that step is in {folders}; set "
            "TrainingArguments(resume_from_checkpoint=<the checkpoint folder>) when it is outside output_dir"
        )


def open_window_state(adapters: Iterable[tuple]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The names of the ``(tuner, adapter name, config)`` adapters whose selection window is open, and their
    window state under ``<adapter name>/<key>``; the statistics are synchronized over ranks first."""
    open_windows, tensors = [], {}
    for tuner, adapter_name, _ in adapters:
        if tuner.selection_window_open(adapter_name):
            tuner.synchronize_selection_statistics(adapter_name)  # the same on every rank from here on
            open_windows.append(adapter_name)
            state = tuner.selection_state(adapter_name)
            tensors.update({f"{adapter_name}/{key}": tensor for key, tensor in state.items()})
    return open_windows, tensors


def restore_open_windows(adapters: Iterable[tuple], open_windows: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Load back the window state that :func:`open_window_state` saved for ``open_windows``."""
    for tuner, adapter_name, _ in adapters:
        if adapter_name in open_windows:
            prefix = f"{adapter_name}/"
            state = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
            tuner.load_selection_state(adapter_name, state)


def _saved_step(path: str) -> Optional[int]:
    with safe_open(path, framework="pt") as file:
        step = (file.metadata() or {}).get("global_step")
    return int(step) if step is not None else None
