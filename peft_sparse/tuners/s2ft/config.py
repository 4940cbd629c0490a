"""Configuration of S2FT: structured sparse fine-tuning of selected attention heads and FFN channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.utils.peft_types import PeftType

from ...config_base import check_choice, check_non_negative_int, check_positive_int
from ...sparse.config import SparseDeltaConfig

SELECTIONS = ("random", "weight_norm", "gradient")


def check_module_names(name: str, value) -> None:
    """A list of module names: the last part(s) of a module's path, e.g. ``o_proj`` or ``attn.c_proj``."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{name} must be a list of module names such as ['o_proj'], got {value!r}")


@dataclass
class S2ftConfig(SparseDeltaConfig):
    """S2FT: train whole heads and FFN channels of each block, as dense slices of the output projections.

    In every block, ``num_heads`` heads select ``head_dim`` input columns each of the attention output
    modules (``o_proj``), and ``num_channels`` channels select input columns of the FFN output
    modules (``down_proj``) and, optionally, the same rows of the FFN input modules (``up_proj``,
    ``gate_proj``). Only those slices are trained; the forward is a plain linear (the slice is kept
    in the weight, as SFT does) and its gradient a dense GEMM, ``dY^T @ X[:, columns]``.

    Budget: ``num_heads`` / ``num_channels`` per block, or ``lora_rank_budget`` r: as many trainable
    weights (within 5%) as ``LoraConfig(r=r, target_modules="all-linear")`` on the same model, split
    over heads and channels in proportion to the sizes of their matrices. Default: ``lora_rank_budget=16``.

    Example:
        >>> from peft import get_peft_model
        >>> config = S2ftConfig(lora_rank_budget=16, selection="random")
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
        >>> S2ftConfig(num_heads=1, num_channels=128, ffn_input_modules=["up_proj", "gate_proj"]).target_modules
        ['o_proj', 'down_proj', 'up_proj', 'gate_proj']
    """

    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Set from the three *_modules fields (leave it None); any other value is an error."},
    )
    num_heads: Optional[int] = field(
        default=None, metadata={"help": "Heads trained per block (input columns of the attention output modules)."}
    )
    num_channels: Optional[int] = field(
        default=None, metadata={"help": "FFN channels trained per block (input columns of the FFN output modules)."}
    )
    lora_rank_budget: Optional[int] = field(
        default=None,
        metadata={
            "help": "Instead of num_heads/num_channels: the trainable count of LoraConfig(r=lora_rank_budget, "
            "target_modules='all-linear') on the model (within 5%), split over heads and channels."
        },
    )
    attention_output_modules: list[str] = field(
        default_factory=lambda: ["o_proj"],
        metadata={"help": "Modules whose input columns are grouped in heads of head_dim columns."},
    )
    ffn_output_modules: list[str] = field(
        default_factory=lambda: ["down_proj"],
        metadata={"help": "Modules whose input columns are FFN channels."},
    )
    ffn_input_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Modules whose output rows are the same FFN channels (e.g. ['up_proj', 'gate_proj']); they "
            "train the rows of the channels chosen for their block's FFN output module. Default: none."
        },
    )
    head_dim: Optional[int] = field(
        default=None,
        metadata={"help": "Columns per head; None: the model config's head_dim, else hidden_size / num_attention_heads."},
    )
    selection: str = field(
        default="random",
        metadata={
            "help": "'random' (the paper's default), 'weight_norm' (the heads/channels whose columns of the "
            "output module have the largest norm) or 'gradient' (the largest columns of the weight gradient on "
            "calibration batches: call model.base_model.select_by_gradient(batches) before training)."
        },
    )
    init_seed: int = field(default=42, metadata={"help": "Seed of the random selection (per block)."})

    def __post_init__(self) -> None:
        for name in ("attention_output_modules", "ffn_output_modules", "ffn_input_modules"):
            check_module_names(name, getattr(self, name))
        derived = [*self.attention_output_modules, *self.ffn_output_modules, *self.ffn_input_modules]
        if len(set(derived)) != len(derived):
            raise ValueError(
                "attention_output_modules, ffn_output_modules and ffn_input_modules must not share a module name, "
                f"got {derived}"
            )
        if not derived:
            raise ValueError("attention_output_modules and ffn_output_modules must not both be empty")
        if self.ffn_input_modules and not self.ffn_output_modules:
            raise ValueError(
                f"ffn_input_modules {self.ffn_input_modules} take their channels from ffn_output_modules, "
                "which is empty"
            )
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) or sorted(self.target_modules) != sorted(derived)
        ):
            raise ValueError(
                "target_modules is set by S2ftConfig from attention_output_modules, ffn_output_modules and "
                f"ffn_input_modules; leave it None, got {self.target_modules!r}"
            )
        self.target_modules = derived
        super().__post_init__()
        self.peft_type = PeftType.S2FT
        self._check_budget()
        if self.head_dim is not None:
            check_positive_int("head_dim", self.head_dim)
        check_choice("selection", self.selection, SELECTIONS)
        check_non_negative_int("init_seed", self.init_seed)

    def _check_budget(self) -> None:
        counts = {"num_heads": self.num_heads, "num_channels": self.num_channels}
        if self.lora_rank_budget is not None:
            given = [name for name, value in counts.items() if value is not None]
            if given:
                raise ValueError(
                    f"give either lora_rank_budget or num_heads/num_channels, not both (got lora_rank_budget="
                    f"{self.lora_rank_budget}, {given[0]}={counts[given[0]]})"
                )
            check_positive_int("lora_rank_budget", self.lora_rank_budget)
            return
        if self.num_heads is None and self.num_channels is None:
            self.lora_rank_budget = 16
            return
        for name, value in counts.items():
            if value is not None:
                check_non_negative_int(name, value)
        self.num_heads = self.num_heads or 0
        self.num_channels = self.num_channels or 0
        if self.num_heads + self.num_channels == 0:
            raise ValueError("num_heads and num_channels must not both be 0 (nothing would be trained)")
        if self.num_heads and not self.attention_output_modules:
            raise ValueError(f"num_heads={self.num_heads} needs attention_output_modules, got []")
        if self.num_channels and not self.ffn_output_modules:
            raise ValueError(f"num_channels={self.num_channels} needs ffn_output_modules, got []")
