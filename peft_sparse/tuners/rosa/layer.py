"""RoSA's layer: the shared sparse-delta layer plus a LoRA part, ``y = x (W0 + S)^T + scaling * (x A^T) B^T``.

The sparse part S is the shared machinery of :class:`~peft_sparse.sparse.layer.SparseDeltaLayer`
unchanged (held in the weight where safe, SDDMM gradient, ``W0`` in state dicts, additive path on
held, tied, quantized or sharded weights). The LoRA part is computed beside it, as peft's LoRA does.
While its gradient mask is being chosen (``mask_pending``), an adapter's sparse part is left out of
the forward altogether (its values get no gradient and stay zero) and the layer hands the dense
weight gradient's factors to the adapter's observer instead.

Merging adds ``scaling * B @ A`` to the weight densely, beneath the sparse writes (they are taken
out first and written back over it, so restoring their entries keeps the low-rank part), and
unmerging subtracts it again: exact up to float rounding, as for LoRA. While merged, the low-rank
part is in the weight as a merged LoRA's is (a disabled forward subtracts it from the output, so
it shows ``W0`` and stays merged); the sparse part never shows in a state dict.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ...sparse.gradient import observe_weight_gradient
from ...sparse.layer import SparseDeltaLinear
from ...sparse.quantized_layer import QuantizedSparseDeltaLinear


class LowRankPart:
    """What RoSA adds to a sparse-delta layer: per adapter ``rosa_A`` [r, in], ``rosa_B`` [out, r], ``scaling``."""

    def _ensure_low_rank_state(self) -> None:
        # created on first use: the shared layer's __init__ calls update_layer, whose set_adapter reads them
        if "rosa_A" not in self._modules:
            self.rosa_A = nn.ParameterDict({})
            self.rosa_B = nn.ParameterDict({})
            self.rosa_dropout = nn.ModuleDict({})
            self.r: dict[str, int] = {}
            self.lora_alpha: dict[str, float] = {}
            self.scaling: dict[str, float] = {}
            self.mask_pending: set[str] = set()

    def update_layer(self, adapter_name: str, indices: torch.Tensor, *args, **kwargs) -> None:
        self._ensure_low_rank_state()
        super().update_layer(adapter_name, indices, *args, **kwargs)

    def update_low_rank(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_weights: bool = True,
        init_seed: int = 0,
        inference_mode: bool = False,
    ) -> None:
        """Add the LoRA part of ``adapter_name``: A Kaiming-uniform (seeded by ``init_seed``), B zero.

        ``init_weights=False``: B is initialised like A (a non-zero delta, for tests).
        """
        self._ensure_low_rank_state()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.rosa_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        generator = torch.Generator().manual_seed(init_seed)
        weight_a, weight_b = torch.empty(r, self.in_features), torch.zeros(self.out_features, r)
        nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5), generator=generator)  # as peft's LoRA A
        if not init_weights:
            nn.init.kaiming_uniform_(weight_b, a=math.sqrt(5), generator=generator)
        self.rosa_A[adapter_name] = nn.Parameter(weight_a)
        self.rosa_B[adapter_name] = nn.Parameter(weight_b)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # --- deltas ---------------------------------------------------------------------------------

    def low_rank_delta(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped like the stored weight ([out, in]; [in, out] for Conv1D)."""
        delta = (self.rosa_B[adapter_name].detach().float() @ self.rosa_A[adapter_name].detach().float())
        delta = delta * self.scaling[adapter_name]  # [out, in]
        return delta.T if self.weight_is_transposed else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The whole delta, sparse part plus ``scaling * B @ A``, shaped and typed like the shared layer's."""
        sparse = super().get_delta_weight(adapter_name)
        return (sparse.float() + self.low_rank_delta(adapter_name).to(sparse.device)).to(sparse.dtype)

    # --- forward --------------------------------------------------------------------------------

    def _wanted_adapters(self) -> list[str]:
        return [name for name in super()._wanted_adapters() if name not in self.mask_pending]

    def low_rank_output(self, adapter_name: str, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """``scaling * B (A dropout(x))`` [..., out], in the adapter's dtype (no dropout: what a merge adds)."""
        weight_a = self.rosa_A[adapter_name]
        x = x.to(weight_a.dtype)
        hidden = F.linear(self.rosa_dropout[adapter_name](x) if dropout else x, weight_a)  # [..., r]
        return F.linear(hidden, self.rosa_B[adapter_name]) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.forward_with_deltas(x, *args, **kwargs)
        if self.disable_adapters and self.merged:  # the merged LoRA parts stay in the weight: take them out here
            for adapter_name in self.merged_adapters:
                result = result - self.low_rank_output(adapter_name, x, dropout=False).to(result.dtype)
        if self.disable_adapters or self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self.rosa_A:
                result = result + self.low_rank_output(adapter_name, x).to(result.dtype)
        for adapter_name, observer in self.gradient_observers.items():
            # a pending sparse part has no SDDMM binding to observe through: watch the output's gradient
            if adapter_name in self.mask_pending and result.requires_grad:
                result.register_hook(partial(observe_weight_gradient, observer, x.detach(), self.weight_is_transposed))
        return result

    # --- merging --------------------------------------------------------------------------------

    @torch.no_grad()
    def _add_low_rank_to_weight(self, adapter_names: list[str], sign: float) -> None:
        """Add (``sign=1``) or subtract (``-1``) the LoRA parts in the weight, with no sparse delta written on it."""
        self._sync_written([])  # sparse writes lie on top; the next forward (or merge) writes them back
        weight = self.get_base_layer().weight
        for adapter_name in adapter_names:
            delta = self.low_rank_delta(adapter_name).to(weight.device)
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge both parts: the LoRA part densely into the weight, then the sparse part written on top."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.delta_values]
        refusal = self.merge_refusal(adapter_names)
        if refusal is not None:
            raise ValueError(refusal)
        if safe_merge:
            weight = self.get_base_layer().weight
            for name in adapter_names:
                if not torch.isfinite(weight.float() + self.get_delta_weight(name).float()).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self._add_low_rank_to_weight(adapter_names, sign=1.0)
        super().merge(adapter_names=adapter_names)

    def unmerge(self) -> None:
        """Take the sparse parts out (bit-exact), then subtract the LoRA parts (exact up to rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        merged = list(self.merged_adapters)
        super().unmerge()
        self._add_low_rank_to_weight(list(reversed(merged)), sign=-1.0)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        if not merge and self.merged:  # unload without merging gives back W0, LoRA parts included
            self.unmerge()
        return super().unload_and_optionally_merge_module(merge, safe_merge, adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:  # peft refuses to delete a merged adapter
        super().delete_adapter(adapter_name)
        self.mask_pending.discard(adapter_name)


class RosaLinear(LowRankPart, SparseDeltaLinear):
    """RoSA around an ``nn.Linear`` or transformers ``Conv1D``: a sparse part at ``indices`` plus a LoRA part.

    Example:
        >>> layer = RosaLinear(nn.Linear(8, 4), "default", torch.tensor([0, 5, 17], dtype=torch.int32))
        >>> layer.update_low_rank("default", r=2, lora_alpha=2, lora_dropout=0.0)
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    adapter_layer_names = ("rosa_values", "rosa_A", "rosa_B")
    other_param_names = ("rosa_indices", "r", "lora_alpha", "scaling", "rosa_dropout")

    def __repr__(self) -> str:
        return "rosa." + super().__repr__().removeprefix("sparse.")


class QuantizedRosaLinear(LowRankPart, QuantizedSparseDeltaLinear):
    """RoSA on a bitsandbytes 4-bit/8-bit base: both parts are computed beside the weight; merging is refused."""

    adapter_layer_names = ("rosa_values", "rosa_A", "rosa_B")
    other_param_names = ("rosa_indices", "r", "lora_alpha", "scaling", "rosa_dropout")
