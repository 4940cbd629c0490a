"""The two mask rules of the sparse part: RoSA's accumulated gradients and DSEE's sparse residual of ``W0``."""

from __future__ import annotations

import torch

from ...sparse.distributed import gather_token_factors
from ...sparse.indices import index_dtype_for
from ...sparse.principal import low_rank_approximation


def top_entries(score: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted flat indices [count] of the ``count`` largest entries of ``score`` (any shape)."""
    top = torch.topk(score.reshape(-1), count, sorted=False).indices
    return top.sort().values.to(index_dtype_for(score.numel()))


class AccumulatedGradientMask:
    """RoSA's mask statistic: the dense weight gradient of every micro-batch of a window, accumulated.

    ``statistic="squared"``: the sum of squared gradients (RoSA's ``mean_squared``, an empirical
    diagonal Fisher); ``"mean"``: the sum of gradients, ranked by magnitude. Sums rank like RoSA's
    running means. Holds one fp32 matrix [rows, cols] while the window is open (the reference keeps
    the same, on the CPU). A statistics object of :meth:`SparseDeltaTuner.open_selection_window`:
    every DDP/FSDP rank accumulates the global batch's gradient (so averaging them before choosing
    changes nothing), saved in checkpoints.

    Example:
        >>> mask = AccumulatedGradientMask((2, 3), "squared", torch.device("cpu"))
        >>> mask.observe(torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, -1.0, 0.5]]))  # gradient = left @ right
        >>> mask.grow(2).tolist()
        [0, 3]
    """

    def __init__(self, weight_shape: tuple[int, int], statistic: str, device: torch.device) -> None:
        self.statistic = statistic
        self.accumulated = torch.zeros(weight_shape, dtype=torch.float32, device=device)
        self.observed = False

    def observe(self, left: torch.Tensor, right: torch.Tensor) -> None:
        # under DDP/FSDP: the global batch's gradient from every rank's token factors (activation-sized), as
        # the square of the mean of ranks' gradients is not the mean of their squares
        left, right = gather_token_factors(left, right)
        gradient = left.float() @ right.float()  # [rows, cols]: the stored weight's gradient
        self.accumulated += gradient.square_() if self.statistic == "squared" else gradient
        self.observed = True

    def score(self) -> torch.Tensor:
        return self.accumulated if self.statistic == "squared" else self.accumulated.abs()

    def grow(self, count: int) -> torch.Tensor:
        return top_entries(self.score(), count)

    def process_sums(self) -> list[torch.Tensor]:
        return [self.accumulated] if self.observed else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"accumulated": self.accumulated} if self.observed else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.accumulated.copy_(state["accumulated"])
            self.observed = True


def residual_magnitude_indices(weight: torch.Tensor, rank: int, count: int, seed: int) -> torch.Tensor:
    """DSEE's mask: sorted flat indices [count] of the largest ``|W0 - L_r(W0)|``, ``L_r`` the rank-``rank`` SVD.

    One step of the low-rank + sparse decomposition of ``W0`` (DSEE iterates GreBsmo): what the
    leading ``rank`` directions leave unexplained, largest first. Randomized SVD, seeded.

    Example:
        >>> residual_magnitude_indices(torch.randn(16, 8), rank=2, count=5, seed=0).shape
        torch.Size([5])
    """
    residual = weight.detach().float() - low_rank_approximation(weight, rank, "randomized", seed=seed)
    return top_entries(residual.abs_(), count)
