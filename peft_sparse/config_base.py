"""What every peft_sparse config shares: version stamps, and a check of the adapter file before loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from peft.config import PeftConfig

from .format_version import FORMAT_VERSION, __version__, check_format_version
from .loading import check_adapter_weights_file


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class ConfigTypeError(TypeError, ValueError):
    """A config field of the wrong type; also a ``ValueError``, which config errors were before it."""


def check_type(name: str, value, types: tuple, wanted: str) -> None:
    """``ConfigTypeError`` naming the field when ``value`` is not of ``types`` (a bool never counts as a number)."""
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigTypeError(f"{name} must be {wanted}, got {value!r} (a {type(value).__name__})")


def check_positive_int(name: str, value) -> None:
    check_type(name, value, (int,), "a positive integer")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative_int(name: str, value) -> None:
    check_type(name, value, (int,), "a non-negative integer")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def check_fraction(name: str, value) -> None:
    check_type(name, value, (int, float), "a number in (0, 1]")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def checked_density(
    density: Optional[float], num_tunable_weights: Optional[int], default_density: float
) -> Optional[float]:
    """The sparse budget's ``density``: ``default_density`` when neither it nor ``num_tunable_weights`` is given.

    Raises ``ValueError`` when both are given, or when the one given is out of range.

    Example:
        >>> checked_density(None, None, default_density=0.01), checked_density(None, 1000, default_density=0.01)
        (0.01, None)
    """
    if density is not None and num_tunable_weights is not None:
        raise ValueError(
            f"give either density or num_tunable_weights, not both (got density={density}, "
            f"num_tunable_weights={num_tunable_weights})"
        )
    if num_tunable_weights is not None:
        check_positive_int("num_tunable_weights", num_tunable_weights)
        return None
    density = default_density if density is None else density
    check_fraction("density", density)
    return density


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_target_modules(name: str, value) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} must be None, a string, or a list of strings, got {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty")


@dataclass
class PeftSparseConfig(PeftConfig):
    """Base of the peft_sparse configs.

    ``save_pretrained`` stamps ``peft_sparse_version`` and ``format_version`` into
    ``adapter_config.json``; loading an adapter of a newer format than this library reads raises
    ``ValueError`` (see :mod:`peft_sparse.format_version`). ``from_pretrained`` (which peft calls
    before it changes the base model) also checks that a local ``adapter_model.safetensors`` is
    complete, and marks the config so that a failed checkpoint load is rolled back.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={"help": "Module names or a regex to adapt; 'all-linear' takes every linear layer but the output head."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave out."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a new head)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as an exact no-op (zero delta). False: a seeded, non-zero random "
            "delta (for tests and debugging, like peft's init_weights=False of its other methods)."
        },
    )
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
        check_target_modules("target_modules", self.target_modules)
        check_target_modules("exclude_modules", self.exclude_modules)
        check_bool("init_weights", self.init_weights)

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
