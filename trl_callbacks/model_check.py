"""A callback that drives no adapter of the model would train silently without its method: refuse it."""

from __future__ import annotations

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
