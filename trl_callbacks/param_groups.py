"""Give a set of parameters their own optimizer param group after the Trainer has built the optimizer."""

from __future__ import annotations

import functools
from itertools import chain
from typing import Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from peft_sparse.sparse.optimizer_state import unwrap_optimizer


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
    ``optimizer.state_dict()`` keeps listing the groups as they were before (the Trainer builds its
    optimizer that way again when it resumes from a checkpoint); call this again after resuming.

    Example:
        >>> group = isolate_param_group(trainer.optimizer, trainer.lr_scheduler, gates, lr=1e-2)  # doctest: +SKIP
    """
    wanted = {id(param) for param in params}
    for group in optimizer.param_groups:
        if {id(param) for param in group["params"]} == wanted:
            return group
    before = [list(existing["params"]) for existing in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["params"] = [param for param in group["params"] if id(param) not in wanted]
    optimizer.add_param_group({"params": list(params), "lr": lr, "weight_decay": weight_decay})
    group = optimizer.param_groups[-1]
    _follow_schedule(lr_scheduler, group)
    after = [list(existing["params"]) for existing in optimizer.param_groups]
    # prepended: hooks of later isolations undo theirs first
    unwrap_optimizer(optimizer).register_state_dict_post_hook(
        functools.partial(_pack_in_layout, after=after, before=before), prepend=True
    )
    return group


def _pack_in_layout(optimizer, state_dict: dict, after: list[list], before: list[list]) -> dict:
    """Re-pack an optimizer ``state_dict`` taken with the groups ``after`` as if taken with ``before``.

    Checkpoints then have the groups the Trainer builds, so resuming loads them into its fresh
    optimizer; isolating again afterwards moves the restored per-parameter state along.
    """
    old_index = {id(param): index for index, param in enumerate(chain(*after))}
    new_index = {id(param): index for index, param in enumerate(chain(*before))}
    saved_state = state_dict["state"]
    state = {
        new_index[id(param)]: saved_state[old_index[id(param)]]
        for param in chain(*before)
        if old_index[id(param)] in saved_state
    }
    groups = [
        {**saved, "params": [new_index[id(param)] for param in params]}
        for saved, params in zip(state_dict["param_groups"], before)
    ]
    return {"state": state, "param_groups": groups}


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
    if "state_dict" not in vars(scheduler):  # the first added group: checkpoints list the Trainer's groups only
        scheduler.state_dict = functools.partial(_state_of_first_groups, scheduler, len(scheduler.lr_lambdas))
    scheduler.base_lrs.append(group["lr"])
    scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[-1](scheduler.last_epoch)
    scheduler._last_lr.append(group["lr"])


def _state_of_first_groups(scheduler: LambdaLR, count: int) -> dict:
    """``scheduler.state_dict()`` for its first ``count`` param groups (those the Trainer built)."""
    state = type(scheduler).state_dict(scheduler)
    del state["state_dict"]  # this override itself, an instance attribute
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        state[key] = state[key][:count]
    return state
