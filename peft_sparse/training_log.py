"""Reading a Trainer's log history (``trainer.state.log_history`` or a saved ``trainer_state.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from transformers.trainer_callback import TrainerState

TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer's name for it (transformers.trainer.TRAINER_STATE_NAME)

LogHistory = list[dict]


def load_log_history(source: Union[LogHistory, str, Path]) -> LogHistory:
    """The log history from a list (returned as is), a ``trainer_state.json`` file, or a folder holding one.

    Example:
        >>> history = load_log_history("out/checkpoint-100")  # doctest: +SKIP
        >>> history[-1]["sparse/churn"]  # doctest: +SKIP
        0.12
    """
    if isinstance(source, list):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / TRAINER_STATE_NAME
    if not path.is_file():
        raise ValueError(
            f"log_history must be a list, a {TRAINER_STATE_NAME} file or a folder with one, got '{source}'"
        )
    return TrainerState.load_from_json(str(path)).log_history


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def latest_metrics(log_history: LogHistory) -> dict[str, float]:
    """The last logged value of every scalar metric, leaving out per-layer entries (``prefix/name/<layer>``)."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if _is_scalar(value) and key.count("/") < 2:
                metrics[key] = value
    return metrics


def metric_series(log_history: LogHistory, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of every log entry that has ``key``."""
    steps, values = [], []
    for entry in log_history:
        if _is_scalar(entry.get(key)):
            steps.append(entry.get("step", len(steps)))
            values.append(entry[key])
    return steps, values
