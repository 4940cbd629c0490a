"""Configuration of SoRA: LoRA with a gate vector between A and B, sparsified by a proximal step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils.peft_types import PeftType

from ...config_base import PeftSparseConfig, check_choice, check_positive_int
from .proximal import XI_SCHEDULES, scheduled_xi

GATE_INITS = ("ones", "randn")


def check_number(name: str, value, minimum: float = 0.0, allow_minimum: bool = True) -> None:
    """``value`` must be a real number above ``minimum`` (or equal to it when ``allow_minimum``)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or value < minimum or (value == minimum and not allow_minimum):
        bound = f">= {minimum}" if allow_minimum else f"> {minimum}"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


@dataclass
class SoraConfig(PeftSparseConfig):
    """SoRA (Ding et al., 2023): ``h = W0 x + (alpha / r) * B (g * (A x))`` with a gate ``g`` [r] per layer.

    After every optimizer step ``trl_callbacks.SoraCallback`` soft-thresholds every gate by
    ``gate_lr_t * xi_t`` (``xi_t`` itself with ``scale_xi_by_lr=False``), where ``xi_t`` follows
    ``xi_schedule`` from ``xi_start`` to ``xi_end``; ranks whose gate reaches zero are dead and
    ``export_sora_to_lora`` drops them.

    Example:
        >>> from peft import get_peft_model
        >>> config = SoraConfig(r=16, xi_schedule="linear", xi_start=0.0, xi_end=0.5, gate_lr=1e-2)
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    """

    r: int = field(default=8, metadata={"help": "Starting rank of every adapted layer."})
    alpha: float = field(default=8.0, metadata={"help": "The delta is scaled by alpha / r (as lora_alpha)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    gate_init: str = field(
        default="ones",
        metadata={"help": "'ones' (SoRA starts as LoRA) or 'randn' (standard normal, as the reference)."},
    )
    gate_lr: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the gates (own optimizer group); None: the Trainer's."}
    )
    xi_start: float = field(default=0.0, metadata={"help": "Sparsity strength xi at the first optimizer step."})
    xi_end: Optional[float] = field(
        default=None, metadata={"help": "xi at the last optimizer step; None: xi_start (constant)."}
    )
    xi_schedule: str = field(
        default="constant",
        metadata={"help": "How xi moves from xi_start to xi_end: 'constant', 'linear', 'log_linear' or 'exp'."},
    )
    scale_xi_by_lr: bool = field(
        default=True,
        metadata={
            "help": "True: the threshold is gate_lr_t * xi (the exact proximal step of the penalty xi * |g|). "
            "False: the threshold is xi itself, as in the reference implementation."
        },
    )
    l1_weight: float = field(
        default=0.0,
        metadata={"help": "Adds l1_weight * sum|g| / (number of gate entries) to the loss's gradient (0: off)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SORA
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha, allow_minimum=False)
        check_number("dropout", self.dropout)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_choice("gate_init", self.gate_init, GATE_INITS)
        if self.gate_lr is not None:
            check_number("gate_lr", self.gate_lr, allow_minimum=False)
        self._check_xi()
        check_number("l1_weight", self.l1_weight)

    def _check_xi(self) -> None:
        check_choice("xi_schedule", self.xi_schedule, XI_SCHEDULES)
        check_number("xi_start", self.xi_start)
        if self.xi_end is None:
            self.xi_end = self.xi_start
        check_number("xi_end", self.xi_end)
        if self.xi_schedule == "constant" and self.xi_end != self.xi_start:
            raise ValueError(
                f"xi_end must equal xi_start (or be None) with xi_schedule='constant', got xi_start={self.xi_start} "
                f"and xi_end={self.xi_end}; use 'linear', 'log_linear' or 'exp' to move xi"
            )
        if self.xi_schedule == "exp" and min(self.xi_start, self.xi_end) <= 0:
            raise ValueError(
                f"xi_start and xi_end must be > 0 with xi_schedule='exp', got xi_start={self.xi_start} "
                f"and xi_end={self.xi_end}"
            )
        if not isinstance(self.scale_xi_by_lr, bool):
            raise ValueError(f"scale_xi_by_lr must be True or False, got {self.scale_xi_by_lr!r}")

    def xi_at(self, step: int, total_steps: int) -> float:
        """Scheduled xi at optimizer step ``step`` (0-based) of ``total_steps``."""
        return scheduled_xi(self.xi_schedule, self.xi_start, self.xi_end, step, total_steps)
