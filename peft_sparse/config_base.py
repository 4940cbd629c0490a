"""What every peft_sparse config shares: version stamps, and a check of the adapter file before loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from peft.config import PeftConfig

from .format_version import FORMAT_VERSION, __version__, check_format_version
from .loading import check_adapter_weights_file


@dataclass
class PeftSparseConfig(PeftConfig):
    """Base of the peft_sparse configs.

    ``save_pretrained`` stamps ``peft_sparse_version`` and ``format_version`` into
    ``adapter_config.json``; loading an adapter of a newer format than this library reads raises
    ``ValueError`` (see :mod:`peft_sparse.format_version`). ``from_pretrained`` (which peft calls
    before it changes the base model) also checks that a local ``adapter_model.safetensors`` is
    complete, and marks the config so that a failed checkpoint load is rolled back.
    """

    peft_sparse_version: str = field(
        default=__version__, metadata={"help": "peft_sparse version that saved this adapter (set on save)."}
    )
    format_version: int = field(
        default=FORMAT_VERSION,
        metadata={"help": "Layout version of the saved adapter (set on save); newer than this library reads: error."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_format_version(self.format_version, self.peft_sparse_version)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        self.peft_sparse_version, self.format_version = __version__, FORMAT_VERSION
        super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_adapter_weights_file(Path(pretrained_model_name_or_path, subfolder or ""))
        # peft injects the adapter next and then loads the checkpoint: if that load fails, the
        # tuner takes the injected adapter out again (peft_sparse.loading.AllOrNothingTuner)
        config._awaits_checkpoint = True
        return config
