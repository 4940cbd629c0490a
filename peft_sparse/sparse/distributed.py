"""Collectives for selection statistics under torch.distributed (DDP), no-ops in a single process; FSDP detection."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes in the default group, or 1 when torch.distributed is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (every rank gets the same bits)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over all processes, in one collective per dtype and device.

    Example:
        >>> rows, cols = torch.ones(3), torch.ones(5)
        >>> all_reduce_mean_([rows, cols])  # a no-op in a single process
    """
    size = world_size()
    if size == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for members in groups.values():
        flat = torch.cat([member.reshape(-1) for member in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= size
        for member, reduced in zip(members, flat.split([member.numel() for member in members])):
            member.copy_(reduced.view_as(member))


def is_fsdp_managed(model: nn.Module) -> bool:
    """True if FSDP wraps (v1) or shards (v2, ``fully_shard``) any submodule of ``model``."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())
