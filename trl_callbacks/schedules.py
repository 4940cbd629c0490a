"""Schedules for the fraction of sparse entries replaced at each selection step."""

from __future__ import annotations

import math


def reselection_rate(initial_rate: float, schedule: str, step: int, total_steps: int) -> float:
    """The fraction of entries to replace at optimizer ``step`` of ``total_steps``.

    ``linear``: ``p0 * (1 - t/T)``; ``cosine``: ``p0 * (1 + cos(pi t/T)) / 2``; ``constant``: ``p0``.

    Example:
        >>> reselection_rate(0.2, "linear", 50, 100)
        0.1
    """
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "linear":
        return initial_rate * (1.0 - progress)
    if schedule == "cosine":
        return initial_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "constant":
        return initial_rate
    raise ValueError(f"schedule must be one of ('linear', 'cosine', 'constant'), got {schedule!r}")
