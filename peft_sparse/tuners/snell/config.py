"""Configuration of SNELL (kernelized low-rank sparse tuning) and its SNELLA budget allocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils.peft_types import PeftType

from triton_kernels.snell_matmul import KERNELS

from ...config_base import PeftSparseConfig, check_bool, check_choice, check_positive_int

ALLOCATIONS = ("none", "snella")
DELTA_IN_PLACE_HELP = (
    "True: write the thresholded delta into the frozen weight where safe, once per optimizer step (a free forward; "
    "on a bf16/fp16 base it sees round(W0 + delta)). False, or dropout > 0: a separate term recomputed in every "
    "forward and backward (exact W0 + delta, slower)."
)


def check_sparsity(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def check_positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class SnellConfig(PeftSparseConfig):
    """SNELL: a sparse delta ``E = top-|K| entries of K``, ``K[j, i] = sum_h c_h kappa(a_i^h, b_j^h)``.

    Each target weight [out, in] gets input factors [groups, in, r / groups] and output factors
    [groups, out, r / groups]; only those are trained. Every forward keeps the largest-magnitude
    ``1 - sparsity`` of ``K``'s entries (no indices are stored). ``allocation="snella"`` moves
    the per-layer sparsity over training from ``sparsity`` to an average ``target_sparsity``, by
    importance (drive it with ``trl_callbacks.SnellAllocationCallback``).

    Example:
        >>> from peft import get_peft_model
        >>> config = SnellConfig(r=32, kernel="distance_diff", sparsity=0.9, target_modules="all-linear")
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
        >>> model.merge_and_unload()  # doctest: +SKIP
    """

    r: int = field(default=32, metadata={"help": "Width of each factor (split evenly into kernel_groups groups)."})
    kernel_groups: int = field(
        default=2,
        metadata={"help": "Groups H the factor width is split into; distance kernels pair them with signs +, -."},
    )
    kernel: str = field(
        default="distance_diff",
        metadata={
            "help": "'distance_diff' (sum_h c_h ||a_i^h - b_j^h||, c_h = kernel_scale * (-1)^h, as in the paper), "
            "'rbf' (sum_h c_h exp(-rbf_gamma ||a_i^h - b_j^h||^2)) or 'linear' (kernel_scale * <a_i, b_j>: LoRA)."
        },
    )
    kernel_scale: float = field(default=0.1, metadata={"help": "Magnitude of the coefficients c_h."})
    rbf_gamma: float = field(default=1.0, metadata={"help": "Bandwidth of the 'rbf' kernel."})
    sparsity: float = field(
        default=0.9,
        metadata={"help": "Fraction of each delta's entries set to zero, in [0, 1) (initial value under SNELLA)."},
    )
    magnitude_competition: bool = field(
        default=False,
        metadata={
            "help": "Multiply kept entries by their detached |K| (the paper's competition: gradients scale with "
            "magnitude). Needs init_weights=False, since |K| is 0 at the zero initialisation."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1) (0: in place)."})
    delta_in_place: bool = field(default=True, metadata={"help": DELTA_IN_PLACE_HELP})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the delta starts at exactly 0 (odd groups copy even ones; 'linear' zeros the output "
            "factors). False: all factors random (the reference initialisation; small non-zero delta)."
        },
    )
    threshold_sample_size: Optional[int] = field(
        default=16384,
        metadata={
            "help": "Estimate each threshold from this many sampled entries (kept fraction off by about "
            "sqrt(q(1-q)/m)); None = exact k-th value over the whole matrix."
        },
    )
    allocation: str = field(
        default="none", metadata={"help": "'none' (fixed sparsity) or 'snella' (per-layer budgets by importance)."}
    )
    target_sparsity: Optional[float] = field(
        default=None, metadata={"help": "SNELLA: average sparsity reached at the end of the schedule, in [0, 1)."}
    )
    allocation_interval: int = field(default=10, metadata={"help": "SNELLA: optimizer steps between allocations."})
    allocation_warmup_steps: int = field(
        default=0, metadata={"help": "SNELLA: steps at the initial budget before it starts to decrease."}
    )
    allocation_final_steps: int = field(
        default=0, metadata={"help": "SNELLA: last steps of training at the target budget."}
    )
    importance_beta: float = field(
        default=0.85, metadata={"help": "SNELLA: EMA factor of the importance |theta * grad|, in (0, 1)."}
    )
    uncertainty_beta: float = field(
        default=0.85, metadata={"help": "SNELLA: EMA factor of the importance's uncertainty, in (0, 1)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SNELL
        check_positive_int("r", self.r)
        check_positive_int("kernel_groups", self.kernel_groups)
        check_choice("kernel", self.kernel, KERNELS)
        if self.r % self.kernel_groups:
            raise ValueError(f"r must be a multiple of kernel_groups ({self.kernel_groups}), got {self.r}")
        if self.kernel != "linear" and self.kernel_groups % 2:
            raise ValueError(
                f"kernel_groups must be even for kernel={self.kernel!r} (groups come in +/- pairs), "
                f"got {self.kernel_groups}"
            )
        check_positive_float("kernel_scale", self.kernel_scale)
        check_positive_float("rbf_gamma", self.rbf_gamma)
        check_sparsity("sparsity", self.sparsity)
        check_sparsity("dropout", self.dropout)
        check_bool("magnitude_competition", self.magnitude_competition)  # init_weights: PeftSparseConfig
        check_bool("delta_in_place", self.delta_in_place)
        if self.magnitude_competition and self.init_weights:
            raise ValueError(
                "magnitude_competition=True needs init_weights=False: it scales gradients by |delta|, which is "
                "exactly 0 everywhere at init_weights=True, got init_weights=True"
            )
        if self.threshold_sample_size is not None:
            check_positive_int("threshold_sample_size", self.threshold_sample_size)
        self._check_allocation()

    def _check_allocation(self) -> None:
        check_choice("allocation", self.allocation, ALLOCATIONS)
        if self.allocation == "none":
            if self.target_sparsity is not None:
                raise ValueError(
                    f"target_sparsity needs allocation='snella', got target_sparsity={self.target_sparsity} "
                    "with allocation='none'"
                )
            return
        if self.target_sparsity is None:
            raise ValueError("target_sparsity must be set when allocation='snella', got None")
        check_sparsity("target_sparsity", self.target_sparsity)
        check_positive_int("allocation_interval", self.allocation_interval)
        check_non_negative_int("allocation_warmup_steps", self.allocation_warmup_steps)
        check_non_negative_int("allocation_final_steps", self.allocation_final_steps)
        for name in ("importance_beta", "uncertainty_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
