"""Metrics from our callbacks into the Trainer's logs, where TensorBoard, W&B and other integrations see them.

The Trainer hands one ``logs`` dict to every callback's ``on_log`` in list order, and its list puts
the reporting integrations (``report_to``) ahead of the callbacks a user passes: keys those add in
``on_log`` reach ``trainer.state.log_history`` but never TensorBoard or W&B. A ``LoggingCallback``
therefore moves itself ahead of every other callback that implements ``on_log``, at ``on_init_end``
and again at ``on_train_begin`` (for callbacks added with ``trainer.add_callback``). Callbacks get no
reference to the Trainer's callback handler, so it is found on the call stack (it is the caller).
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler


def _calling_handler(callback: TrainerCallback) -> Optional[CallbackHandler]:
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(other is callback for other in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


def _implements_on_log(callback: TrainerCallback) -> bool:
    return type(callback).on_log is not TrainerCallback.on_log


def move_ahead_of_loggers(callback: TrainerCallback) -> None:
    """Move ``callback`` (called from inside one of its events) before the first other callback
    with an ``on_log``, unless that one is a ``LoggingCallback`` too (their relative order is kept).

    Safe while the handler iterates its list: the moved callback goes to an earlier position, so the
    callbacks after it keep theirs.
    """
    handler = _calling_handler(callback)
    if handler is None:  # called outside a Trainer
        return
    callbacks = handler.callbacks
    position = next(index for index, other in enumerate(callbacks) if other is callback)
    first_logger = next(
        (
            index
            for index, other in enumerate(callbacks[:position])
            if _implements_on_log(other) and not isinstance(other, LoggingCallback)
        ),
        None,
    )
    if first_logger is not None:
        callbacks.insert(first_logger, callbacks.pop(position))


class LoggingCallback(TrainerCallback):
    """Base class: ``metrics(model)`` goes into every Trainer log, ahead of the reporting integrations.

    Example:
        >>> class StepCounter(LoggingCallback):
        ...     def metrics(self, model):
        ...         return {"demo/answer": 42}
        >>> trainer = Trainer(model=model, args=args, callbacks=[StepCounter()])  # doctest: +SKIP
    """

    def metrics(self, model: Optional[nn.Module]) -> dict[str, float]:
        """Values to add to the current log (keys like ``method/name`` or ``method/name/<layer>``)."""
        return {}

    def on_init_end(self, args, state, control, **kwargs):
        move_ahead_of_loggers(self)
        return super().on_init_end(args, state, control, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        move_ahead_of_loggers(self)
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None:
            return
        values = self.metrics(model)
        if not values:
            return
        logs.update(values)
        if state.log_history:  # the Trainer appended its copy of `logs` before calling on_log
            state.log_history[-1].update(values)
