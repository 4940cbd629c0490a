"""Keep an optimizer's per-entry state aligned with a values tensor whose slots were remapped."""

from __future__ import annotations

import torch


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def remap_optimizer_state(
    optimizer: torch.optim.Optimizer, parameter: torch.nn.Parameter, source_positions: torch.Tensor
) -> None:
    """Move each per-entry state tensor of ``parameter`` (Adam moments, momentum, ...) to the new slots.

    ``source_positions`` [k]: old slot of each new slot, or -1 for a grown slot, whose state
    is reset to zero. Scalar state (Adam's ``step``) is kept: the schedule is not restarted.
    """
    state = unwrap_optimizer(optimizer).state.get(parameter)
    if not state:
        return
    kept = source_positions >= 0
    gather_from = source_positions.clamp(min=0)
    for value in state.values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value.copy_(torch.where(kept, value[gather_from], torch.zeros_like(value)))
