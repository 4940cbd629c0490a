"""Keep an optimizer's per-entry state aligned with a values tensor whose slots were remapped."""

from __future__ import annotations

import torch

from .distributed import assign_full_, full_tensor
from .quantized_optimizer_state import blockwise_quantized_states, remap_blockwise_quantized


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

    ``parameter`` [k] and ``source_positions`` [k]: old slot of each new slot, or -1 for a grown
    slot, whose state is reset to zero. State shaped ``[..., k]`` (AdEMAMix's two momenta) is
    remapped along its last dimension. bitsandbytes' block-wise 8-bit state is dequantized,
    remapped and quantized again (``quantized_optimizer_state``). Scalar state (Adam's ``step``)
    is kept: the schedule is not restarted.
    """
    state = unwrap_optimizer(optimizer).state.get(parameter)
    if not state:
        return
    kept = source_positions >= 0
    gather_from = source_positions.clamp(min=0)
    quantized = blockwise_quantized_states(state)
    for name, (absmax_name, qmap_name) in quantized.items():
        remap_blockwise_quantized(state[name], state[absmax_name], state[qmap_name], source_positions)
    scales = {key for keys in quantized.values() for key in keys}  # absmax, and qmap shared by all parameters
    for name, value in state.items():
        if name in quantized or name in scales or not torch.is_tensor(value):
            continue
        if value.shape[-1:] == parameter.shape:
            whole = full_tensor(value)  # FSDP2: moments are sharded like the parameter
            assign_full_(value, torch.where(kept, whole[..., gather_from], torch.zeros_like(whole)))
