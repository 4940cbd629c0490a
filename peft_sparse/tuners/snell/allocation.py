"""SNELLA budget math: the cubic schedule of the global nonzero budget, its split across layers, importance.

The budget (non-zero delta entries summed over all adapted matrices) starts at the count the
initial ``sparsity`` gives and falls to the count of ``target_sparsity``; each allocation splits
it across layers in proportion to their importance score (exact integer sum, no layer above its
size). Importance per factor entry is ``|theta * grad|``, smoothed by an EMA; its uncertainty is an
EMA of ``|importance - smoothed|``; a layer's score is the mean of their product over both factors.
"""

from __future__ import annotations

import torch

from ...sparse.tuner import split_budget


def scheduled_budget(
    initial: int, target: int, step: int, total_steps: int, warmup_steps: int, final_steps: int
) -> int:
    """Nonzeros allowed at ``step``: ``initial`` during warm-up, ``target`` in the last ``final_steps``,
    and ``target + (initial - target) * (1 - progress)^3`` in between (rounded down).

    Example:
        >>> scheduled_budget(1000, 200, step=5, total_steps=10, warmup_steps=0, final_steps=0)
        300
    """
    decay_steps = total_steps - warmup_steps - final_steps
    if step <= warmup_steps:
        return initial
    if step > total_steps - final_steps or decay_steps <= 0:
        return target
    remaining = 1 - (step - warmup_steps) / decay_steps
    return int(target + (initial - target) * remaining**3)


def allocate_budget(budget: int, scores: dict[str, float], capacities: dict[str, int]) -> dict[str, int]:
    """Split ``budget`` over layers in proportion to ``scores``, never above a layer's capacity.

    Layers that would exceed their capacity get it and the rest is re-split among the others.
    The counts sum to ``min(budget, sum(capacities))`` exactly. All-zero scores split by capacity.

    Example:
        >>> allocate_budget(10, {"a": 3.0, "b": 1.0}, {"a": 5, "b": 100})
        {'a': 5, 'b': 5}
    """
    budget = min(budget, sum(capacities.values()))
    counts: dict[str, int] = {}
    open_layers = dict(scores)
    while open_layers:
        remaining = budget - sum(counts.values())
        weights = open_layers if sum(open_layers.values()) > 0 else {name: capacities[name] for name in open_layers}
        shares = split_budget(remaining, weights)
        full = {name for name, share in shares.items() if share >= capacities[name]}
        if not full:
            counts.update(shares)
            break
        for name in full:
            counts[name] = capacities[name]
            del open_layers[name]
    return counts


class ImportanceTracker:
    """EMA of ``|theta * grad|`` and of its uncertainty for a set of factor tensors.

    Example:
        >>> tracker = ImportanceTracker(0.85, 0.85)
        >>> p = torch.ones(3, requires_grad=True); p.sum().backward()
        >>> tracker.update({"w": p}); round(tracker.score(["w"]), 6)
        0.019125
    """

    def __init__(self, importance_beta: float, uncertainty_beta: float) -> None:
        self.importance_beta, self.uncertainty_beta = importance_beta, uncertainty_beta
        self.importance: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, parameters: dict[str, torch.Tensor]) -> None:
        """Fold in the current ``|theta * grad|`` of every parameter that has a gradient."""
        for name, parameter in parameters.items():
            if parameter.grad is None:
                continue
            current = (parameter * parameter.grad).abs().nan_to_num_(0.0).float()
            if name not in self.importance:
                self.importance[name] = torch.zeros_like(current)
                self.uncertainty[name] = torch.zeros_like(current)
            smoothed = self.importance[name].lerp_(current, 1 - self.importance_beta)
            self.uncertainty[name].lerp_((current - smoothed).abs_(), 1 - self.uncertainty_beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMAs as ``{"importance/<name>": ..., "uncertainty/<name>": ...}`` (for checkpoints)."""
        return {
            f"{kind}/{name}": tensor
            for kind in ("importance", "uncertainty")
            for name, tensor in getattr(self, kind).items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the EMAs by those of ``state_dict()``."""
        self.importance, self.uncertainty = {}, {}
        for key, tensor in state.items():
            kind, name = key.split("/", 1)
            getattr(self, kind)[name] = tensor.float().clone()

    def score(self, names: list[str]) -> float:
        """Sum over ``names`` of mean(smoothed importance * uncertainty); 0 before any update."""
        return sum(
            float((self.importance[name] * self.uncertainty[name]).mean()) for name in names if name in self.importance
        )
