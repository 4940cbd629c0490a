"""A callback that drives no adapter of the model would train silently without its method: refuse it."""

from __future__ import annotations

from typing import Iterator

from peft import PeftModel
from torch import nn
from transformers import TrainerCallback

CALLBACK_OF_EACH_METHOD = (
    "SparseConfig, LiftConfig: SparseUpdateCallback; SoraConfig: SoraCallback; "
    'SnellConfig(allocation="snella"): SnellAllocationCallback; RosaConfig(mask_rule="gradient"): RosaCallback; '
    'SnellConfig(allocation="none"), RosaConfig(mask_rule="magnitude"), LoRA and other peft methods: none'
)


def describe_adapters(model: nn.Module) -> str:
    """The model's active adapters, e.g. ``adapter 'default' (LoraConfig)``, or what it is without any."""
    for module in model.modules():
        if isinstance(module, PeftModel):
            names = module.active_adapters
            adapters = ", ".join(f"'{name}' ({type(module.peft_config[name]).__name__})" for name in names)
            return f"adapter{'s' if len(names) > 1 else ''} {adapters}"
    return f"no peft adapter (a {type(model).__name__})"


def active_adapters_of(model: nn.Module, tuner_type: type) -> Iterator[tuple[nn.Module, str, object]]:
    """``(tuner, adapter name, config)`` of every active adapter of the ``tuner_type`` tuners inside ``model``
    (a PeftModel, maybe wrapped by DDP).

    Example:
        >>> for tuner, adapter_name, config in active_adapters_of(model, SoraModel): ...  # doctest: +SKIP
    """
    for module in model.modules():
        if isinstance(module, tuner_type):
            for adapter_name, config in module.peft_config.items():
                if adapter_name in module.active_adapters:
                    yield module, adapter_name, config


def check_model_has_method(callback: TrainerCallback, model: nn.Module, has_method: bool, methods: str) -> None:
    """Unless ``has_method``, raise ``ValueError`` naming ``callback``, its ``methods`` and the model's adapters.

    Example:
        >>> check_model_has_method(self, model, any(sora_adapters(model)), "SoraConfig")  # doctest: +SKIP
    """
    if not has_method:
        raise ValueError(
            f"{type(callback).__name__} drives {methods} adapters, got a model with {describe_adapters(model)}; "
            f"pass the callback of the model's method ({CALLBACK_OF_EACH_METHOD})"
        )
