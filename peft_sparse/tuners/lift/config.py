"""Configuration of LIFT: fine-tune only the principal weights of each matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils.peft_types import PeftType

from ...config_base import check_choice, check_fraction, check_positive_int
from ...sparse.config import SparseDeltaConfig
from ...sparse.principal import SVD_METHODS


@dataclass
class LiftConfig(SparseDeltaConfig):
    """LIFT: train the entries of each target matrix that are largest in its rank-``rank`` approximation.

    Budget per matrix [m, n]: either ``density`` (default 0.05) or ``lora_rank_budget`` r_b, the
    LoRA-matched count ``min((m + n) * r_b, m * n)``. ``rank`` is an int, or a float in (0, 1] taken
    as a fraction of ``min(m, n)``.

    Example:
        >>> from peft import get_peft_model
        >>> config = LiftConfig(density=0.05, rank=128, target_modules="all-linear")
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    """

    density: Optional[float] = field(
        default=None, metadata={"help": "Fraction of each target matrix that is trainable, in (0, 1]. Default 0.05."}
    )
    lora_rank_budget: Optional[int] = field(
        default=None,
        metadata={"help": "Instead of density: as many entries per matrix as LoRA of this rank, min((m+n)*r, m*n)."},
    )
    rank: Union[int, float] = field(
        default=128,
        metadata={"help": "Rank of the approximation: a positive int, or a float in (0, 1] (fraction of min(m, n))."},
    )
    svd_method: str = field(
        default="randomized",
        metadata={"help": "'randomized' (torch.svd_lowrank, fast) or 'exact' (torch.linalg.svd)."},
    )
    svd_power_iterations: int = field(
        default=4, metadata={"help": "Subspace iterations of the randomized SVD (more: closer to exact)."}
    )
    mask_update_interval: Optional[int] = field(
        default=None,
        metadata={
            "help": "Recompute the approximation and the mask from the current weights every this many optimizer "
            "steps (needs SparseUpdateCallback). None: the mask is fixed."
        },
    )
    init_seed: int = field(default=42, metadata={"help": "Seed of the randomized SVD (per layer)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LIFT
        if self.density is not None and self.lora_rank_budget is not None:
            raise ValueError(
                f"give either density or lora_rank_budget, not both (got density={self.density}, "
                f"lora_rank_budget={self.lora_rank_budget})"
            )
        if self.lora_rank_budget is None:
            if self.density is None:
                self.density = 0.05
            check_fraction("density", self.density)
        else:
            check_positive_int("lora_rank_budget", self.lora_rank_budget)
        if isinstance(self.rank, float):
            check_fraction("rank", self.rank)
        else:
            check_positive_int("rank", self.rank)
        check_choice("svd_method", self.svd_method, SVD_METHODS)
        check_positive_int("svd_power_iterations", self.svd_power_iterations)
        if self.mask_update_interval is not None:
            check_positive_int("mask_update_interval", self.mask_update_interval)
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise ValueError(f"init_seed must be a non-negative integer, got {self.init_seed!r}")

    def rank_for(self, shape: tuple[int, int]) -> int:
        """The approximation rank for a matrix of ``shape``."""
        smaller = min(shape)
        if isinstance(self.rank, float):
            return max(1, round(self.rank * smaller))
        return min(self.rank, smaller)

    def count_for(self, shape: tuple[int, int]) -> int:
        """The number of trainable entries for a matrix of ``shape``."""
        rows, columns = shape
        if self.lora_rank_budget is not None:
            return min((rows + columns) * self.lora_rank_budget, rows * columns)
        return max(1, round(self.density * rows * columns))

    # The selection schedule as SparseUpdateCallback reads it: a refresh needs no gradient window.
    @property
    def updates_indices(self) -> bool:
        return self.mask_update_interval is not None

    @property
    def reselection_steps(self) -> Optional[int]:
        return self.mask_update_interval

    @property
    def selection_accumulation_steps(self) -> int:
        return 0
