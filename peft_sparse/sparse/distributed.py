"""Collectives for selection statistics under torch.distributed (DDP, FSDP), no-ops in a single process;
detection of sharded weights and whole-tensor access to sharded (DTensor) parameters."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


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


@torch.no_grad()
def gather_token_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the global batch's weight gradient, from every rank's ``left`` [rows, T_r] and ``right`` [T_r, cols].

    Each rank's gradient is ``left @ right`` of its own mean loss; the global batch's is their mean,
    so the tokens are concatenated in rank order and ``left`` is divided by the world size. Costs one
    all-gather of ``T * (rows + cols)`` values (activation-sized, never a dense gradient).
    """
    size = world_size()
    if size == 1:
        return left, right
    tokens = torch.tensor([left.shape[1]], device=left.device)
    counts = [torch.zeros_like(tokens) for _ in range(size)]
    dist.all_gather(counts, tokens)
    most = max(int(count) for count in counts)
    padded_left = torch.nn.functional.pad(left.contiguous(), (0, most - left.shape[1]))  # zero tokens add nothing
    padded_right = torch.nn.functional.pad(right.contiguous(), (0, 0, 0, most - right.shape[0]))
    lefts = [torch.empty_like(padded_left) for _ in range(size)]
    rights = [torch.empty_like(padded_right) for _ in range(size)]
    dist.all_gather(lefts, padded_left)
    dist.all_gather(rights, padded_right)
    lefts = [part[:, : int(count)] for part, count in zip(lefts, counts)]
    rights = [part[: int(count)] for part, count in zip(rights, counts)]
    return torch.cat(lefts, 1) / size, torch.cat(rights, 0)


def is_sharded_parameter(parameter: torch.Tensor) -> bool:
    """True for a parameter that FSDP2 (a ``DTensor``) or DeepSpeed ZeRO-3 (``ds_id``) partitions over ranks."""
    return isinstance(parameter, DTensor) or hasattr(parameter, "ds_id")


def is_sharding_managed(module: nn.Module) -> bool:
    """True if FSDP (v1 or v2) or DeepSpeed ZeRO-3 manages ``module``'s weight.

    Inside a forward, FSDP2 has swapped the sharded weight for a gathered plain tensor, so the
    weight alone does not tell; FSDP marks every module it manages with ``_is_fsdp_managed_module``.
    """
    return bool(getattr(module, "_is_fsdp_managed_module", False)) or is_sharded_parameter(module.weight)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for a ``DTensor`` (a collective), else ``tensor`` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``tensor``: a ``DTensor``'s local shard, else ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (the same on every rank) that this rank holds of ``like``: for a ``DTensor``,
    its shard laid out as ``like``'s (no communication), else ``full`` itself."""
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


@torch.no_grad()
def assign_full_(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` (the same on every rank) into ``tensor``; a ``DTensor`` keeps only its own shard (no communication)."""
    local_tensor(tensor).copy_(local_part(tensor, full))
