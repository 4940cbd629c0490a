"""Give a set of parameters their own optimizer param group after the Trainer has built the optimizer."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def isolate_param_group(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Optional[object],
    params: Sequence[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
) -> dict:
    """Move ``params`` out of their groups into a new group with ``lr`` and ``weight_decay``; return that group.

    A group that already holds exactly ``params`` is returned unchanged (the user built the
    optimizer that way). The new group follows the ``LambdaLR`` schedule of the others (every
    transformers schedule is one) with ``lr`` as its base. Call it before the first step.

    Example:
        >>> group = isolate_param_group(trainer.optimizer, trainer.lr_scheduler, gates, lr=1e-2)  # doctest: +SKIP
    """
    wanted = {id(param) for param in params}
    for group in optimizer.param_groups:
        if {id(param) for param in group["params"]} == wanted:
            return group
    for group in optimizer.param_groups:
        group["params"] = [param for param in group["params"] if id(param) not in wanted]
    optimizer.add_param_group({"params": list(params), "lr": lr, "weight_decay": weight_decay})
    group = optimizer.param_groups[-1]
    _follow_schedule(lr_scheduler, group)
    return group


def _follow_schedule(lr_scheduler: Optional[object], group: dict) -> None:
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the scheduler
    if scheduler is None:
        return
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"lr_scheduler must be a LambdaLR (as every transformers schedule) to add a param group to it, got "
            f"{type(scheduler).__name__}; build the optimizer with the group already in place instead"
        )
    group["initial_lr"] = group["lr"]
    scheduler.base_lrs.append(group["lr"])
    scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[-1](scheduler.last_epoch)
    scheduler._last_lr.append(group["lr"])
