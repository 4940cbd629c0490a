"""What the configs of sparse-delta methods (SFT, LIFT) share beyond :class:`PeftSparseConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config_base import PeftSparseConfig, check_bool


def check_values_per_module(name: str, value) -> None:
    """``value`` must be None or a dict from module names to positive integers."""
    if value is None:
        return
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(count, int) and not isinstance(count, bool) and count > 0
        for key, count in value.items()
    ):
        raise ValueError(f"{name} must be None or a dict of module name -> positive integer, got {value!r}")


SAVE_DTYPES = ("bfloat16", "float16", "float32")


def check_save_dtype(name: str, value) -> None:
    if value is not None and value not in SAVE_DTYPES:
        raise ValueError(f"{name} must be None (the values' training dtype) or one of {SAVE_DTYPES}, got {value!r}")


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

    values_per_module: Optional[dict[str, int]] = field(
        default=None,
        metadata={
            "help": "Exact number of trainable entries of each target module (full module name -> count), instead "
            "of the density / budget fields. Set by add_weighted_adapter: a composed adapter holds the union of its "
            "sources' indices."
        },
    )

    save_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "dtype of the saved values: None keeps their training dtype (float32 on a float32/bf16/fp16 "
            "base), or 'bfloat16', 'float16', 'float32'. Loading casts them back to the training dtype."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("delta_in_place", self.delta_in_place)
        check_values_per_module("values_per_module", self.values_per_module)
        check_save_dtype("save_dtype", self.save_dtype)

    @property
    def saved_values_dtype(self) -> Optional[torch.dtype]:
        """``save_dtype`` as a torch dtype (None: the values are saved as they are)."""
        return None if self.save_dtype is None else getattr(torch, self.save_dtype)
