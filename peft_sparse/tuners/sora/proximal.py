"""SoRA's sparsifying math: the exact soft-threshold (proximal step of an L1 penalty) and the xi schedules."""

from __future__ import annotations

import math

import torch

XI_SCHEDULES = ("constant", "linear", "log_linear", "exp")


@torch.no_grad()
def soft_threshold_(gate: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place ``g <- sign(g) * max(|g| - threshold, 0)``: the proximal step of ``threshold * |g|``.

    Every entry moves exactly ``threshold`` towards zero or stops at zero (no dead zone
    beyond ``threshold``). Returns ``gate``.

    Example:
        >>> soft_threshold_(torch.tensor([0.5, -0.15, 0.05]), 0.1)
        tensor([ 0.4000, -0.0500,  0.0000])
    """
    return gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0))


def scheduled_xi(schedule: str, xi_start: float, xi_end: float, step: int, total_steps: int) -> float:
    """xi at optimizer step ``step`` (0-based) of ``total_steps``: ``xi_start`` at the first, ``xi_end`` at the last.

    With progress ``p = step / (total_steps - 1)``: ``linear`` interpolates xi; ``log_linear``
    interpolates ``exp(xi)`` (rises faster than linear early on); ``exp`` interpolates ``log(xi)``
    (geometric: slower early on); ``constant`` is ``xi_start``. The last two follow the
    reference's ``log_linear`` / ``exp_linear`` lambda schedules, per step instead of per stage.

    Example:
        >>> scheduled_xi("exp", 1e-4, 1e-2, 5, 11)
        0.001
    """
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if schedule == "constant":
        return xi_start
    if schedule == "linear":
        return xi_start + (xi_end - xi_start) * progress
    if schedule == "log_linear":
        return math.log(math.exp(xi_start) + (math.exp(xi_end) - math.exp(xi_start)) * progress)
    if schedule == "exp":
        return xi_start * (xi_end / xi_start) ** progress
    raise ValueError(f"xi_schedule must be one of {XI_SCHEDULES}, got {schedule!r}")
