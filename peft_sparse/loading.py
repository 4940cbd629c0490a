"""All-or-nothing adapters: a failed injection or checkpoint load leaves the base model as it was.

peft changes the base model in place (swaps target modules for adapter layers, freezes its
parameters) *before* it reads the checkpoint. Our tuners snapshot the module tree first and put it
back when injection fails, or when the checkpoint that follows does not fit the model. A safe
merge checks every layer before merging any (peft merges layer by layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

PEFT_KEY_PREFIX = "base_model.model."


def check_adapter_weights_file(folder: Path) -> None:
    """Raise ValueError if ``folder`` holds an ``adapter_model.safetensors`` that safetensors cannot open.

    safetensors' own message ("Error while deserializing header: ...") does not say which file or
    what to do; a truncated download or a hand-edited file is the usual cause.
    """
    path = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a complete safetensors file ({error}); it was probably truncated or edited: "
            "save or download the adapter again"
        ) from error


class ModelSnapshot:
    """The children of every module, every parameter's ``requires_grad``, and ``model.peft_config``.

    Holds references only (no tensor copies), so taking one costs O(number of modules).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.children = [(module, dict(module.named_children())) for module in model.modules()]
        self.requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        self.peft_config = model.__dict__.get("peft_config")

    def restore(self, adapter_name: str) -> None:
        """Put back the recorded state and remove ``adapter_name`` from adapter layers that existed before."""
        for module, children in self.children:
            for name, child in children.items():
                if module._modules.get(name) is not child:
                    setattr(module, name, child)
            if isinstance(module, BaseTunerLayer) and _holds_adapter(module, adapter_name):
                module.delete_adapter(adapter_name)
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)
        if self.peft_config is None:
            self.model.__dict__.pop("peft_config", None)
        else:
            self.model.peft_config = self.peft_config


def _holds_adapter(layer: BaseTunerLayer, adapter_name: str) -> bool:
    return any(adapter_name in getattr(layer, name, {}) for name in layer.adapter_layer_names)


def _display(key: str, adapter_name: str) -> str:
    """``base_model.model.<module>.<attribute>.<adapter>`` -> ``<module>.<attribute>``."""
    return key.removeprefix(PEFT_KEY_PREFIX).removesuffix(f".{adapter_name}")


def check_checkpoint_tensors(
    model_state: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor], prefix: str, adapter_name: str
) -> None:
    """Raise ValueError unless ``checkpoint`` has exactly the adapter tensors of ``model_state``, with their shapes.

    Adapter tensors are the keys ``<module>.<attribute>.<adapter_name>`` whose attribute starts
    with the tuner's ``prefix`` (e.g. ``sparse_values``); other keys (``modules_to_save``) are peft's.
    """
    expected = {
        key for key in model_state if key.endswith(f".{adapter_name}") and key.split(".")[-2].startswith(prefix)
    }
    missing = sorted(expected - checkpoint.keys())
    if missing:
        raise ValueError(
            f"the adapter checkpoint has no tensor for {len(missing)} adapter weight(s) of this model, e.g. "
            f"'{_display(missing[0], adapter_name)}'; was the adapter trained on another base model or with other "
            "target_modules?"
        )
    unexpected = sorted(
        key
        for key in checkpoint
        if key not in model_state and any(part.startswith(prefix) for part in key.split(".")[-2:])
    )
    if unexpected:
        raise ValueError(
            f"the adapter checkpoint has {len(unexpected)} tensor(s) for modules this model does not have, e.g. "
            f"'{_display(unexpected[0], adapter_name)}'; was the adapter trained on another base model?"
        )
    for key in sorted(expected):
        saved, wanted = tuple(checkpoint[key].shape), tuple(model_state[key].shape)
        if saved != wanted:
            raise ValueError(
                f"'{_display(key, adapter_name)}': the checkpoint has shape {saved}, this model expects {wanted}; "
                "was the adapter trained on another base model or config?"
            )


class AllOrNothingTuner(BaseTuner):
    """BaseTuner whose injections and checkpoint loads either succeed or leave the model unchanged.

    Subclasses add method-specific checkpoint checks in ``_check_checkpoint``.
    """

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._snapshots_before_checkpoint: dict[str, ModelSnapshot] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        if "." in adapter_name:  # checked first: a failed injection could not be undone by name
            raise KeyError(f'adapter_name must not contain "." (it becomes a parameter name), got {adapter_name!r}')
        from .quantization import keep_trainable_layouts  # here: quantization imports the layers, which import this

        keep_trainable_layouts(model)
        snapshot = ModelSnapshot(model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            snapshot.restore(adapter_name)
            raise
        # set by PeftSparseConfig.from_pretrained: a checkpoint load follows, which may still fail
        if self.peft_config[adapter_name].__dict__.pop("_awaits_checkpoint", False):
            self._snapshots_before_checkpoint[adapter_name] = snapshot

    @torch.no_grad()
    def _check_finite(self, adapter_names: Optional[list[str]]) -> None:
        """Raise before a safe merge touches any layer (peft checks layer by layer, after merging earlier ones)."""
        for adapter_name in adapter_names or self.active_adapters:
            for module in self.model.modules():
                if not isinstance(module, BaseTunerLayer) or not _holds_adapter(module, adapter_name):
                    continue
                tensors = (getattr(module, name)[adapter_name] for name in module.adapter_layer_names)
                if not all(torch.isfinite(tensor).all() for tensor in tensors):
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"
                    )

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        """Raise before any layer merges if one of them refuses (a quantized or tied weight)."""
        for name, module in self.model.named_modules():
            refusal = getattr(module, "merge_refusal", None)
            if refusal is None:
                continue
            held = [adapter for adapter in (adapter_names or module.active_adapters) if _holds_adapter(module, adapter)]
            message = refusal(held)
            if message is not None:
                raise ValueError(f"module '{name}': {message}")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        if safe_merge:
            self._check_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, safe_merge: bool = False, adapter_names=None, **kwargs):
        if merge:
            self._check_mergeable(adapter_names)
        if merge and safe_merge:
            self._check_finite(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, safe_merge=safe_merge, adapter_names=adapter_names, **kwargs
        )

    @classmethod
    def _check_checkpoint(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> None:
        """Method-specific checks of a remapped checkpoint (may convert tensors in place); raise ValueError."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner: Optional[AllOrNothingTuner] = getattr(model, "base_model", None)
        snapshot = tuner._snapshots_before_checkpoint.pop(adapter_name, None) if isinstance(tuner, cls) else None
        try:
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            check_checkpoint_tensors(model.state_dict(), remapped, cls.prefix, adapter_name)
            cls._check_checkpoint(model, config, adapter_name, remapped)
        except Exception:
            if snapshot is not None:
                snapshot.restore(adapter_name)
                tuner.peft_config.pop(adapter_name, None)
            raise
        return remapped
