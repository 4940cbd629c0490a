"""The shared sparse-delta layer: a frozen dense weight plus trainable ``values`` at flat ``indices``.

The delta lives *merged in place* in the frozen weight (``W = W0 + delta``) so the
forward pass is a plain linear. The weight entries under each written delta are
kept, so restoring ``W0`` (unmerge, disable, unload) is bit-exact. Writes are lazy:
after an optimizer step changes ``values`` (or a selection step changes
``indices``), the next forward sees they differ from what was written and re-writes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_kernels import scatter_assign

from ..quantization import delta_dtype, dequantized_weight, quantization_of, weight_matrix_shape
from .gradient import GradientObserver, MergedSparseDeltaLinear, SparseDeltaBinding
from .indices import check_index_set, csr_pattern

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


@dataclass
class _WrittenDelta:
    """A delta currently added into the base weight, with what is needed to take it out exactly."""

    indices: torch.Tensor  # copy of the indices written to (the live buffer may change underneath)
    base_values: torch.Tensor  # weight entries at `indices` before the write
    values: torch.Tensor  # copy of the values written


@dataclass
class _CachedPattern:
    indices: torch.Tensor
    indices_version: int
    crow_indices: torch.Tensor
    col_indices: torch.Tensor


class SparseDeltaLayer(BaseTunerLayer):
    """Adapter state for a sparse delta on one weight matrix, keyed by adapter name."""

    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices",)

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        # attribute names come from the class, so each method has its own state-dict prefix
        setattr(self, self.adapter_layer_names[0], nn.ParameterDict({}))
        setattr(self, self.other_param_names[0], BufferDict({}, persistent=True))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._written: dict[str, _WrittenDelta] = {}
        self._patterns: dict[str, _CachedPattern] = {}
        self.gradient_observers: dict[str, GradientObserver] = {}

        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(
                f"sparse-delta layers support torch.nn.Linear and transformers Conv1D, got {type(base).__name__}"
            )
        self.weight_is_transposed = isinstance(base, Conv1D)
        if not base.weight.is_contiguous():
            raise ValueError(f"sparse-delta layers need a contiguous base weight, got strides {base.weight.stride()}")

    @property
    def delta_values(self) -> nn.ParameterDict:
        """Trainable values [k] per adapter."""
        return getattr(self, self.adapter_layer_names[0])

    @property
    def delta_indices(self) -> BufferDict:
        """Sorted flat indices [k] into the base weight per adapter."""
        return getattr(self, self.other_param_names[0])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored ([out, in] for Linear and bitsandbytes layers, [in, out] for Conv1D)."""
        return weight_matrix_shape(self.get_base_layer())

    @property
    def num_entries(self) -> int:
        rows, cols = self.weight_shape
        return rows * cols

    def update_layer(self, adapter_name: str, indices: torch.Tensor, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name`` with trainable zeros at the sorted flat ``indices`` [k]."""
        weight = self.get_base_layer().weight
        check_index_set(indices, self.num_entries, where=f"adapter '{adapter_name}'")
        values_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.delta_values[adapter_name] = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype))
        self.delta_indices[adapter_name] = indices.clone()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def num_values(self, adapter_name: str) -> int:
        return self.delta_values[adapter_name].numel()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta of one adapter, shaped like the base weight (fp32 on a quantized base)."""
        weight = self.get_base_layer().weight
        delta = torch.zeros(self.num_entries, dtype=torch.float32, device=weight.device)
        delta[self.delta_indices[adapter_name].long()] = self.delta_values[adapter_name].detach().float()
        return delta.view(self.weight_shape).to(delta_dtype(self.get_base_layer()))

    @torch.no_grad()
    def effective_weight(self, adapter_name: str) -> torch.Tensor:
        """``W0 + delta`` of one adapter with its current values, as a new fp32 tensor shaped like the weight.

        On a quantized base ``W0`` is dequantized for the call (transient: one matrix at a time).
        """
        weight = dequantized_weight(self.get_base_layer()).clone().view(-1)
        for written in reversed(self._written.values()):  # last-in first-out, as in _sync_written
            weight[written.indices.long()] = written.base_values.float()
        indices = self.delta_indices[adapter_name].long()
        weight[indices] += self.delta_values[adapter_name].detach().float()
        return weight.view(self.weight_shape)

    # --- keeping the written deltas in sync -------------------------------------------------

    def _is_fresh(self, adapter_name: str) -> bool:
        # Compare contents, not tensor versions: fused optimizers (the Trainer's default
        # adamw_torch_fused) update parameters without bumping their version counter.
        # Two O(k) reads per layer are negligible next to the layer's matmul.
        written = self._written[adapter_name]
        return torch.equal(written.values, self.delta_values[adapter_name].detach()) and torch.equal(
            written.indices, self.delta_indices[adapter_name]
        )

    @torch.no_grad()
    def _write(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        values, indices = self.delta_values[adapter_name], self.delta_indices[adapter_name]
        base_values = weight.view(-1)[indices.long()]
        scatter_assign(weight, indices, base_values, values)
        self._written[adapter_name] = _WrittenDelta(indices.clone(), base_values, values.detach().clone())

    @torch.no_grad()
    def _restore(self, adapter_name: str) -> None:
        written = self._written.pop(adapter_name)
        weight = self.get_base_layer().weight
        indices = written.indices.to(weight.device).long()
        weight.view(-1).index_copy_(0, indices, written.base_values.to(weight.device))

    def _sync_written(self, wanted: list[str]) -> None:
        """Make the base weight hold exactly ``W0 + sum(delta[a] for a in wanted)`` with current values."""
        order = list(self._written)
        keep = 0
        while keep < len(order) and order[keep] in wanted and self._is_fresh(order[keep]):
            keep += 1
        # deltas are taken out last-in first-out, so overlapping indices restore bit-exactly
        for adapter_name in reversed(order[keep:]):
            self._restore(adapter_name)
        for adapter_name in wanted:
            if adapter_name not in self._written:
                self._write(adapter_name)

    def _pattern(self, adapter_name: str) -> _CachedPattern:
        indices = self.delta_indices[adapter_name]
        cached = self._patterns.get(adapter_name)
        if cached is None or cached.indices is not indices or cached.indices_version != indices._version:
            # indices change only through in-place copies (selection, load_state_dict), which bump the version
            crow, col = csr_pattern(indices, self.weight_shape)
            cached = _CachedPattern(indices, indices._version, crow, col)
            self._patterns[adapter_name] = cached
        return cached

    # --- peft layer API ---------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into the base weight (``safe_merge`` checks the values for NaN/Inf first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.delta_values]
        if not adapter_names:
            return
        if safe_merge:
            for name in adapter_names:
                if not torch.isfinite(self.delta_values[name]).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self._sync_written(self.merged_adapters + adapter_names)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the base weight bit-exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._sync_written([])
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Return the base layer, with the deltas merged in (``merge``) or with ``W0`` restored."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            self._sync_written([])
        return self.get_base_layer()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self._written:
            self._sync_written([name for name in self._written if name != adapter_name])
        self._patterns.pop(adapter_name, None)
        self.gradient_observers.pop(adapter_name, None)
        if adapter_name in self.merged_adapters:
            self.merged_adapters.remove(adapter_name)
        super().delete_adapter(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    # --- selection support --------------------------------------------------------------------

    @torch.no_grad()
    def replace_indices(
        self, adapter_name: str, drop_positions: torch.Tensor, grown_indices: torch.Tensor
    ) -> torch.Tensor:
        """Drop the slots at ``drop_positions`` and grow zero-valued slots at ``grown_indices``.

        ``k`` stays the same and indices stay sorted; kept entries keep their values.
        Returns ``source_positions`` [k]: for each new slot, its old slot, or -1 if grown.
        """
        values, indices = self.delta_values[adapter_name], self.delta_indices[adapter_name]
        if drop_positions.numel() != grown_indices.numel():
            raise ValueError(
                f"must drop as many slots as it grows, got {drop_positions.numel()} and {grown_indices.numel()}"
            )
        keep = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device)
        keep[drop_positions] = False
        old_positions = torch.arange(indices.numel(), device=indices.device)
        merged_indices = torch.cat([indices[keep], grown_indices.to(indices.dtype)])
        merged_sources = torch.cat(
            [old_positions[keep], torch.full_like(grown_indices, -1, dtype=torch.int64, device=indices.device)]
        )
        order = torch.argsort(merged_indices)
        new_indices, source_positions = merged_indices[order], merged_sources[order]
        check_index_set(new_indices, self.num_entries, where=f"adapter '{adapter_name}'")
        new_values = torch.where(source_positions >= 0, values[source_positions.clamp(min=0)], 0.0)
        values.copy_(new_values)
        indices.copy_(new_indices)
        return source_positions


class SparseDeltaLinear(nn.Module, SparseDeltaLayer):
    """Sparse-delta adapter around an ``nn.Linear`` or transformers ``Conv1D``.

    Example:
        >>> layer = SparseDeltaLinear(nn.Linear(8, 4), "default", torch.tensor([0, 5, 17], dtype=torch.int32))
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, indices: torch.Tensor) -> None:
        super().__init__()
        SparseDeltaLayer.__init__(self, base_layer)
        if quantization_of(self.get_base_layer()) is not None:
            raise ValueError(
                f"a bitsandbytes {type(self.get_base_layer()).__name__} cannot hold the delta in place; "
                "use QuantizedSparseDeltaLinear (get_peft_model picks it for quantized layers)"
            )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self._sync_written([])
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.delta_values]
        self._sync_written(active)
        trainable = [name for name in active if self.delta_values[name].requires_grad]
        if not trainable or not torch.is_grad_enabled():
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        bindings = []
        for name in trainable:
            pattern = self._pattern(name)
            bindings.append(
                SparseDeltaBinding(pattern.crow_indices, pattern.col_indices, self.gradient_observers.get(name))
            )
        return MergedSparseDeltaLinear.apply(
            x, base.weight, base.bias, self.weight_is_transposed, bindings, *(self.delta_values[n] for n in trainable)
        )

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()
