"""Slots of an adapter's ``values`` that keep their value while the others train (SaRA, HFT).

A frozen slot keeps its index and its learned value (it still counts in the delta); it gets a zero
gradient in backward (so gradient clipping and optimizer moments see only trained slots) and its
value is put back after every optimizer step (so momentum and weight decay cannot move it, whatever
the optimizer). The rules that choose frozen slots are plain functions of a layer's weights or of a
seed, so every DDP rank freezes the same slots. Under FSDP2 the values are a sharded ``DTensor``
whose gradient arrives already reduce-scattered: each rank masks and restores its own shard.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .distributed import full_tensor, local_part, local_tensor
from .write_guard import on_optimizer_step


class FrozenSlots:
    """Freeze ``positions`` [f] of ``values`` [k] at their current value until ``release``.

    Example:
        >>> values = nn.Parameter(torch.arange(4.0))
        >>> frozen = FrozenSlots(values, torch.tensor([1, 3]))
        >>> (values * torch.ones(4)).sum().backward()
        >>> values.grad
        tensor([1., 0., 1., 0.])
    """

    def __init__(self, values: nn.Parameter, positions: torch.Tensor) -> None:
        self.values = values
        whole = full_tensor(values.detach())  # under FSDP2: gathered (every rank freezes together)
        self.positions = positions.to(device=whole.device, dtype=torch.long)
        self.gradient_mask = torch.ones_like(whole)  # [k]: 0 at the frozen slots
        self.gradient_mask[self.positions] = 0
        self._local_mask = local_part(values, self.gradient_mask)
        self._local_frozen_values = local_part(values, whole.clone())
        if isinstance(values, DTensor):  # FSDP2 fires only this hook on the sharded parameter, after its reduce-scatter
            self._hook = values.register_post_accumulate_grad_hook(self._mask_local_gradient)
        else:  # before accumulation: DDP then all-reduces the masked gradient
            self._hook = values.register_hook(self.mask_gradient)
        _ACTIVE.add(self)

    def mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` [k] (whole, not sharded) with zeros at the frozen slots."""
        return grad * self.gradient_mask.to(grad)

    @torch.no_grad()
    def _mask_local_gradient(self, values: torch.Tensor) -> None:
        gradient = local_tensor(values.grad)
        gradient.mul_(self._local_mask.to(gradient))

    @torch.no_grad()
    def put_back(self) -> None:
        """Write the frozen values back (after an optimizer step moved them)."""
        if self.positions.numel():
            local = local_tensor(self.values.detach())
            local.copy_(torch.where(self._local_mask.bool(), local, self._local_frozen_values.to(local)))

    def release(self) -> None:
        """Let the frozen slots train again from their current values."""
        self._hook.remove()
        _ACTIVE.discard(self)


_ACTIVE: "weakref.WeakSet[FrozenSlots]" = weakref.WeakSet()


def _put_back_frozen_values() -> None:
    for frozen in list(_ACTIVE):
        frozen.put_back()


on_optimizer_step(_put_back_frozen_values)


def slots_above_threshold(effective_entries: torch.Tensor, threshold: float) -> torch.Tensor:
    """SaRA's progressive adjustment: slots whose ``|W0 + delta|`` [k] rose above ``threshold`` (now effective weights).

    Example:
        >>> slots_above_threshold(torch.tensor([0.1, -0.5, 0.3]), 0.3)
        tensor([1])
    """
    return torch.nonzero(effective_entries.abs() > threshold).flatten()


def random_half(count: int, seed: int) -> torch.Tensor:
    """Sorted positions of a seeded random half of ``range(count)``; an odd ``count`` rounds up or down by a coin flip.

    Example:
        >>> random_half(4, seed=0).numel()
        2
    """
    generator = torch.Generator().manual_seed(seed)
    size = count // 2 + (count % 2) * int(torch.randint(2, (1,), generator=generator))
    return torch.randperm(count, generator=generator)[:size].sort().values
