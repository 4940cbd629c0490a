"""What the configs of sparse-delta methods (SFT, LIFT) share beyond :class:`PeftSparseConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config_base import PeftSparseConfig, check_bool


@dataclass
class SparseDeltaConfig(PeftSparseConfig):
    """Base of :class:`~peft_sparse.SparseConfig` and :class:`~peft_sparse.LiftConfig`."""

    delta_in_place: bool = field(
        default=True,
        metadata={
            "help": "True: keep the delta written into the frozen weight where that is safe (the forward is a plain "
            "linear; on a bf16/fp16 base it sees round(W0 + delta), as AMP full fine-tuning does). False: apply it "
            "as a separate sparse term summed in fp32 (exact W0 + delta, slower)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("delta_in_place", self.delta_in_place)
