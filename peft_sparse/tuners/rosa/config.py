"""Configuration of RoSA / DSEE: a low-rank (LoRA) part plus a sparse part on the same weight."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils.peft_types import PeftType

from ...config_base import check_choice, check_non_negative_int, check_positive_int, check_type, checked_density
from ...sparse.config import SparseDeltaConfig

MASK_RULES = ("gradient", "magnitude")
GRADIENT_STATISTICS = ("squared", "mean")
# RoSA's reference (IST-DASLab/peft-rosa README): schedule "wl64", spa_num_grads=1, grad_acc_mode="mean_squared"
ROSA_MASK_WARMUP_STEPS, ROSA_MASK_ACCUMULATION_STEPS = 64, 1
GRADIENT_RULE_FIELDS = ("mask_warmup_steps", "mask_accumulation_steps", "gradient_statistic")


@dataclass
class RosaConfig(SparseDeltaConfig):
    """RoSA / DSEE: ``delta = scaling * B @ A + S``, a LoRA part and a sparse part S on each target weight.

    The sparse part's budget is ``density`` (fraction of every target matrix; default 0.003, RoSA's)
    or ``num_tunable_weights`` (a global count split over the matrices by size). Its mask:

    * ``mask_rule="gradient"`` (RoSA): LoRA alone for ``mask_warmup_steps`` optimizer steps, then the
      dense weight gradients of ``mask_accumulation_steps`` steps are accumulated (``gradient_statistic``
      ``"squared"``: mean of squared micro-batch gradients, a diagonal Fisher; ``"mean"``: the mean
      gradient, ranked by magnitude); the top-k entries become the mask, fixed from then on, and the
      sparse part trains with the LoRA part. Needs ``trl_callbacks.RosaCallback``.
    * ``mask_rule="magnitude"`` (DSEE): the top-k entries of ``|W0 - L_r(W0)|``, the sparse residual
      of W0 after its rank-``r`` truncated SVD, chosen at injection; both parts train from step 0.

    Example:
        >>> from peft import get_peft_model
        >>> config = RosaConfig(r=16, lora_alpha=16, density=0.003, mask_warmup_steps=64)
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
        >>> RosaConfig(mask_rule="magnitude").mask_warmup_steps is None
        True
    """

    r: int = field(default=8, metadata={"help": "Rank of the LoRA part."})
    lora_alpha: float = field(default=8, metadata={"help": "The LoRA part is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA part's input, in [0, 1)."})
    density: Optional[float] = field(
        default=None,
        metadata={"help": "Fraction of each target matrix in the sparse part, in (0, 1]. Default 0.003 (RoSA's)."},
    )
    num_tunable_weights: Optional[int] = field(
        default=None,
        metadata={"help": "Instead of density: total sparse entries, split over target matrices by size."},
    )
    mask_rule: str = field(
        default="gradient",
        metadata={
            "help": "'gradient' (RoSA: top-k accumulated gradient statistic after a LoRA warmup; needs RosaCallback) "
            "or 'magnitude' (DSEE: top-k |W0 - rank-r SVD of W0|, chosen at injection)."
        },
    )
    mask_warmup_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": f"mask_rule='gradient' only: optimizer steps of LoRA alone before gradients are accumulated "
            f"(RoSA's schedule 'wl<N>'). Default {ROSA_MASK_WARMUP_STEPS}."
        },
    )
    mask_accumulation_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": f"mask_rule='gradient' only: optimizer steps whose gradients (every micro-batch) choose the mask "
            f"(RoSA's spa_num_grads). Default {ROSA_MASK_ACCUMULATION_STEPS}."
        },
    )
    gradient_statistic: Optional[str] = field(
        default=None,
        metadata={
            "help": "mask_rule='gradient' only: 'squared' (mean of squared gradients, RoSA's default 'mean_squared') "
            "or 'mean' (|mean gradient|)."
        },
    )
    init_seed: int = field(
        default=42,
        metadata={"help": "Seed of the LoRA A init and of the placeholder mask before the gradient mask (per layer)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ROSA
        check_positive_int("r", self.r)
        check_type("lora_alpha", self.lora_alpha, (int, float), "a positive number")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        check_type("lora_dropout", self.lora_dropout, (int, float), "a number in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.density = checked_density(self.density, self.num_tunable_weights, default_density=0.003)
        check_choice("mask_rule", self.mask_rule, MASK_RULES)
        self._check_gradient_rule()
        check_non_negative_int("init_seed", self.init_seed)

    def _check_gradient_rule(self) -> None:
        if self.mask_rule != "gradient":
            for name in GRADIENT_RULE_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to mask_rule='gradient' only, got {name}={getattr(self, name)!r} "
                        f"with mask_rule={self.mask_rule!r}"
                    )
            return
        if self.mask_warmup_steps is None:
            self.mask_warmup_steps = ROSA_MASK_WARMUP_STEPS
        if self.mask_accumulation_steps is None:
            self.mask_accumulation_steps = ROSA_MASK_ACCUMULATION_STEPS
        if self.gradient_statistic is None:
            self.gradient_statistic = "squared"
        check_non_negative_int("mask_warmup_steps", self.mask_warmup_steps)
        check_positive_int("mask_accumulation_steps", self.mask_accumulation_steps)
        check_choice("gradient_statistic", self.gradient_statistic, GRADIENT_STATISTICS)

    @property
    def scaling(self) -> float:
        """The LoRA part's scale, ``lora_alpha / r``."""
        return self.lora_alpha / self.r

    @property
    def mask_step(self) -> Optional[int]:
        """The optimizer step after which the gradient mask is chosen (None: the mask is chosen at injection)."""
        if self.mask_rule != "gradient":
            return None
        return self.mask_warmup_steps + self.mask_accumulation_steps
