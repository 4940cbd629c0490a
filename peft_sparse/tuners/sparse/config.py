"""Configuration of sparse fine-tuning (SFT / SpIEL) with periodic prune/regrow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils.peft_types import PeftType

from ...config_base import check_choice, check_fraction, check_positive_int, check_type, checked_density
from ...sparse.config import SparseDeltaConfig

SELECTIONS = ("ag", "ma", "random", "sara", "hft", "id3", "lt-sft")
RATE_SCHEDULES = ("linear", "cosine", "constant")
HFT_GRANULARITIES = ("matrix", "entry")
# SaRA's reference fine-tuning command (lambda_rank)
SARA_NUCLEAR_NORM_WEIGHT = 5e-4
# ID3's reference implementation (selective-peft-toolkit, optimizers/id3.py): D3 = |grad| / (eps + |theta|) ** exp
D3_EPSILON, D3_EXPONENT = 1e-8, 1.0


@dataclass
class SparseConfig(SparseDeltaConfig):
    """Sparse fine-tuning: train ``values`` at a learned set of weight ``indices`` with prune/regrow.

    Give either ``density`` (the fraction of every target matrix; default 0.01) or
    ``num_tunable_weights`` (a global count split over target matrices by size).

    Example:
        >>> from peft import get_peft_model
        >>> config = SparseConfig(density=0.01, target_modules="all-linear", selection="ag")
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    """

    density: Optional[float] = field(
        default=None,
        metadata={"help": "Fraction of each target weight matrix that is trainable, in (0, 1]. Default 0.01."},
    )
    num_tunable_weights: Optional[int] = field(
        default=None,
        metadata={"help": "Total trainable entries, split over target matrices in proportion to their size."},
    )
    selection: str = field(
        default="ag",
        metadata={
            "help": "How entries are regrown: 'ag' (accumulated gradient), 'ma' (momentum approximation: row x "
            "column squared-gradient statistics) or 'random' (indices fixed at their random initial value). "
            "Fixed indices with frozen slots: 'sara' (the smallest |W0| of each matrix; at step reselection_steps the "
            "slots whose |W0 + delta| reached the largest selected |W0| freeze) or 'hft' (random indices; every "
            "reselection_steps steps a new random half, of the matrices or of the entries, freezes). "
            "'id3': every slot starts masked (value 0, frozen); every reselection_steps steps (from the first) the "
            "masked entries with the largest D3 score |grad| / (d3_epsilon + |W|) ** d3_exponent are unmasked, "
            "linearly in the step, until the budget is reached at the last step (needs SparseUpdateCallback). "
            "'lt-sft': fixed indices, the entries that moved most in a dense phase "
            "(peft_sparse.sparse.lottery_ticket.LotteryTicket)."
        },
    )
    reselection_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps between selection steps. Default 20; 1 for selection='id3' (the paper's)."},
    )
    selection_accumulation_steps: int = field(
        default=5,
        metadata={"help": "Optimizer steps before each selection step whose gradients feed the growth statistics."},
    )
    initial_reselection_rate: float = field(
        default=0.2, metadata={"help": "Fraction of entries replaced at the first selection step, in (0, 1]."}
    )
    reselection_rate_schedule: str = field(
        default="linear",
        metadata={"help": "Decay of the replaced fraction over training: 'linear', 'cosine' or 'constant'."},
    )
    init_seed: int = field(default=42, metadata={"help": "Seed of the random initial indices (per layer)."})
    nuclear_norm_weight: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of SaRA's nuclear-norm penalty on each delta (one matrix per optimizer step, in turn; "
            f"needs SparseUpdateCallback). Default {SARA_NUCLEAR_NORM_WEIGHT} for selection='sara', else 0."
        },
    )
    hft_granularity: Optional[str] = field(
        default=None,
        metadata={
            "help": "selection='hft' only: freeze half of each block's adapted matrices ('matrix', the paper's, "
            "default) or half of each matrix's entries ('entry')."
        },
    )
    d3_epsilon: Optional[float] = field(
        default=None,
        metadata={"help": f"selection='id3' only: epsilon of the D3 score, > 0. Default {D3_EPSILON}."},
    )
    d3_exponent: Optional[float] = field(
        default=None,
        metadata={
            "help": f"selection='id3' only: exponent of |W| in the D3 score (0: gradient only; -1: |W * grad|). "
            f"Default {D3_EXPONENT}."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SPARSE
        self.density = checked_density(self.density, self.num_tunable_weights, default_density=0.01)
        check_choice("selection", self.selection, SELECTIONS)
        if self.reselection_steps is None:
            self.reselection_steps = 1 if self.selection == "id3" else 20
        check_positive_int("reselection_steps", self.reselection_steps)
        check_positive_int("selection_accumulation_steps", self.selection_accumulation_steps)
        if not self.freezes_slots and self.selection_accumulation_steps > self.reselection_steps:  # no window
            raise ValueError(
                f"selection_accumulation_steps must be at most reselection_steps ({self.reselection_steps}), "
                f"got {self.selection_accumulation_steps}"
            )
        check_fraction("initial_reselection_rate", self.initial_reselection_rate)
        check_choice("reselection_rate_schedule", self.reselection_rate_schedule, RATE_SCHEDULES)
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise ValueError(f"init_seed must be a non-negative integer, got {self.init_seed!r}")
        self._check_frozen_slot_rules()
        self._check_d3_score()

    def _check_d3_score(self) -> None:
        if self.selection != "id3":
            for name in ("d3_epsilon", "d3_exponent"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to selection='id3' only, got {name}={getattr(self, name)!r} "
                        f"with selection={self.selection!r}"
                    )
            return
        if self.d3_epsilon is None:
            self.d3_epsilon = D3_EPSILON
        if self.d3_exponent is None:
            self.d3_exponent = D3_EXPONENT
        check_type("d3_epsilon", self.d3_epsilon, (int, float), "a positive number")
        if not self.d3_epsilon > 0:
            raise ValueError(f"d3_epsilon must be a positive number, got {self.d3_epsilon!r}")
        check_type("d3_exponent", self.d3_exponent, (int, float), "a number")

    def _check_frozen_slot_rules(self) -> None:
        if self.nuclear_norm_weight is None:
            self.nuclear_norm_weight = SARA_NUCLEAR_NORM_WEIGHT if self.selection == "sara" else 0.0
        check_type("nuclear_norm_weight", self.nuclear_norm_weight, (int, float), "a non-negative number")
        if self.nuclear_norm_weight < 0:
            raise ValueError(f"nuclear_norm_weight must be a non-negative number, got {self.nuclear_norm_weight!r}")
        if self.selection != "hft":
            if self.hft_granularity is not None:
                raise ValueError(
                    f"hft_granularity applies to selection='hft' only, got hft_granularity={self.hft_granularity!r} "
                    f"with selection={self.selection!r}"
                )
            return
        if self.hft_granularity is None:
            self.hft_granularity = "matrix"
        check_choice("hft_granularity", self.hft_granularity, HFT_GRANULARITIES)

    @property
    def updates_indices(self) -> bool:
        """Whether training changes the indices (prune/regrow) or keeps them fixed."""
        return self.selection in ("ag", "ma")

    @property
    def freezes_slots(self) -> bool:
        """Whether some slots keep their value while the others train (SaRA, HFT; ID3's masked slots)."""
        return self.selection in ("sara", "hft", "id3")

    @property
    def unmasks_incrementally(self) -> bool:
        """Whether masked slots are unmasked step by step until the budget is reached (ID3)."""
        return self.selection == "id3"
