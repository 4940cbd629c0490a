"""Forward, merge and unmerge for adapter layers whose delta is a dense matrix added to the base weight."""

from __future__ import annotations

import warnings
from collections.abc import Container
from typing import Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge

from .quantization import check_merge_supported, merge_refusal


class AdditiveDeltaLayer:
    """peft's forward, ``merge`` and ``unmerge`` for a ``BaseTunerLayer`` whose adapters add a delta.

    The layer provides ``get_delta_weight(adapter_name)`` (the delta shaped like the base weight) and
    ``adapter_output(adapter_name, x)`` (the delta applied to ``x``, without materialising it).

    The layer's first ``adapter_layer_names`` entry tells which adapters it holds. Merging adds
    each delta to the base weight (``safe_merge``: the sum is checked for NaN/Inf before it is
    written); unmerging subtracts them again, last merged first (exact up to float rounding, as
    for LoRA). A quantized base layer is refused by ``check_merge_supported``.
    """

    def _held_adapters(self) -> Container[str]:
        """The adapters this layer holds (keys of its first ``adapter_layer_names`` entry)."""
        return getattr(self, self.adapter_layer_names[0])

    def forward_with_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus each active, unmerged adapter's output, in the base output's dtype.

        With adapters disabled, merged ones are unmerged first (as peft's LoRA layer does).
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name in self._held_adapters():
                result = result + self.adapter_output(adapter_name, x)
        return result.to(result_dtype)

    def merge_refusal(self, adapter_names: list[str]) -> Optional[str]:
        """Why ``adapter_names`` cannot be merged into this layer, or None."""
        return merge_refusal(self.get_base_layer(), adapter_names)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        held = self._held_adapters()
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in held]
        check_merge_supported(self.get_base_layer(), adapter_names)
        weight = self.get_base_layer().weight
        for adapter_name in adapter_names:
            delta = self.get_delta_weight(adapter_name)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            weight.data += delta
            self.merged_adapters.append(adapter_name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            weight.data -= self.get_delta_weight(self.merged_adapters.pop())
