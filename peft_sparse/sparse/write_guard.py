"""When a layer may write its delta into the frozen weight, and when a written delta is stale.

Both answers come from host-side counters, so a forward never synchronises with the GPU:

* :class:`GraphHolds` counts the autograd graphs that saved a layer's weight for a backward that
  has not run yet. Writing the weight while one exists would fail that backward ("modified by an
  inplace operation"), so the layer takes the additive path instead.
* :func:`optimizer_steps` counts optimizer steps in this process (a global step post-hook of
  ``torch.optim``). Fused optimizers (the Trainer's ``adamw_torch_fused``) update parameters without
  bumping their version counter, so a written delta is stale when this count, or the version of its
  ``values`` / ``indices`` (``load_state_dict``, selection steps), changed since it was written.
"""

from __future__ import annotations

from typing import Callable

from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0
_step_listeners: list[Callable[[], None]] = []


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1
    for listener in _step_listeners:
        listener()


def on_optimizer_step(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every optimizer step in this process."""
    _step_listeners.append(listener)


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (any ``torch.optim.Optimizer``, fused ones included)."""
    return _optimizer_steps


class GraphHolds:
    """How many autograd graphs hold one layer's weight for a pending backward.

    Example:
        >>> holds = GraphHolds()
        >>> hold = holds.hold()  # stored on the autograd ctx that saved the weight
        >>> holds.count
        1
        >>> hold.release()  # in backward, or when the graph is freed without one
        >>> holds.count
        0
    """

    def __init__(self) -> None:
        self.count = 0

    def hold(self) -> WeightHold:
        return WeightHold(self)

    def __deepcopy__(self, memo) -> GraphHolds:
        return GraphHolds()  # a copied layer is in no graph

    def __getstate__(self) -> dict:
        return {"count": 0}


class WeightHold:
    """One graph's hold on a weight; released once, by backward or when the graph is freed."""

    __slots__ = ("holds",)

    def __init__(self, holds: GraphHolds) -> None:
        self.holds = holds
        holds.count += 1

    def release(self) -> None:
        if self.holds is not None:
            self.holds.count -= 1
            self.holds = None

    def __del__(self) -> None:
        self.release()
