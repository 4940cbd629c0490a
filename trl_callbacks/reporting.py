"""Metrics from our callbacks into the Trainer's logs, where TensorBoard, W&B and other integrations see them.

The Trainer hands one ``logs`` dict to the ``on_log`` of every callback in the order of
``trainer.callback_handler.callbacks``: the reporting integrations (``report_to``) come first, then the
callbacks given to the Trainer, then the console printer / progress bar. A key that a callback adds
in ``on_log`` therefore reaches ``trainer.state.log_history`` and the console, but reaches an
integration only when the callback runs before it. The return value of ``on_log`` cannot carry
keys (it replaces ``control``), and no event hands a callback the Trainer or its handler, so a
callback cannot move itself without reaching into the caller's frames. The order is the Trainer's:
``log_before_reporting(trainer)`` sets it once, after the Trainer is built, with the Trainer's own
``pop_callback`` / ``add_callback``. A ``LoggingCallback`` that it did not place warns at train begin
when ``report_to`` names integrations.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn
from transformers import Trainer, TrainerCallback


def _reads_logs(callback: TrainerCallback) -> bool:
    return type(callback).on_log is not TrainerCallback.on_log and not isinstance(callback, LoggingCallback)


def log_before_reporting(trainer: Trainer) -> Trainer:
    """Move every callback that reads the logs (``report_to`` integrations, printer, progress bar) behind the
    last ``LoggingCallback`` of ``trainer``, each kind in its order; returns ``trainer``.

    Call it after building the Trainer, and again after ``trainer.add_callback`` of a ``LoggingCallback``.

    Example:
        >>> trainer = log_before_reporting(Trainer(model=model, args=args, train_dataset=ds,
        ...                                        callbacks=[SparseUpdateCallback()]))  # doctest: +SKIP
    """
    callbacks = trainer.callback_handler.callbacks
    loggers = [callback for callback in callbacks if isinstance(callback, LoggingCallback)]
    if not loggers:
        return trainer
    last_logger = callbacks.index(loggers[-1])
    for reader in [callback for callback in callbacks[:last_logger] if _reads_logs(callback)]:
        trainer.add_callback(trainer.pop_callback(reader))
    for logger in loggers:
        logger.placed_before_reporting = True
    return trainer


class LoggingCallback(TrainerCallback):
    """Base class: ``metrics(model)`` goes into every Trainer log (and the integrations: ``log_before_reporting``).

    Example:
        >>> class StepCounter(LoggingCallback):
        ...     def metrics(self, model):
        ...         return {"demo/answer": 42}
        >>> trainer = log_before_reporting(Trainer(model=model, args=args, callbacks=[StepCounter()]))  # doctest: +SKIP
    """

    placed_before_reporting: bool = False

    def metrics(self, model: Optional[nn.Module]) -> dict[str, float]:
        """Values to add to the current log (keys like ``method/name`` or ``method/name/<layer>``)."""
        return {}

    def on_train_begin(self, args, state, control, **kwargs):
        if args.report_to and not self.placed_before_reporting:
            warnings.warn(
                f"{type(self).__name__}: its keys reach trainer.state.log_history and the console but not the "
                f"report_to integrations {args.report_to}, which read the logs before it; call "
                "trl_callbacks.log_before_reporting(trainer) after building the Trainer",
                stacklevel=2,
            )
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
