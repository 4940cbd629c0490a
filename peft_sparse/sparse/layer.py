"""The shared sparse-delta layer: a frozen dense weight plus trainable ``values`` at flat ``indices``.

The delta is held in the frozen weight where safe and applied as a sparse term elsewhere, with the
invisibility guarantees of :mod:`.in_place`. Here: the values and indices, their CSR patterns, the
SDDMM gradient binding, the additive CSR term, and prune/regrow (``replace_indices``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from triton_kernels import sparse_delta_matmul

from ..quantization import delta_dtype, dequantized_weight, quantization_of
from .distributed import assign_full_, full_tensor
from .gradient import GradientObserver, SparseDeltaBinding, observe_weight_gradient
from .in_place import SUPPORTED_BASE_LAYERS, InPlaceDeltaLayer
from .indices import check_index_set, csr_pattern, output_major_pattern

__all__ = ["SUPPORTED_BASE_LAYERS", "SparseDeltaLayer", "SparseDeltaLinear"]

# init_weights=False: values start at N(0, INIT_VALUES_STD^2), seeded per layer (for tests, as peft's methods do)
INIT_VALUES_STD = 0.1


@dataclass
class _CachedPattern:
    indices: torch.Tensor
    indices_version: int
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    output_major: Optional[tuple] = None  # (crow, col, permutation) for the additive path


class SparseDeltaLayer(InPlaceDeltaLayer):
    """Adapter state for a sparse delta on one weight matrix, keyed by adapter name."""

    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices",)

    def __init__(self, base_layer: nn.Module, writes_in_place: bool = True) -> None:
        # attribute names come from the class, so each method has its own state-dict prefix
        setattr(self, self.adapter_layer_names[0], nn.ParameterDict({}))
        setattr(self, self.other_param_names[0], BufferDict({}, persistent=True))
        self._patterns: dict[str, _CachedPattern] = {}
        self.gradient_observers: dict[str, GradientObserver] = {}
        InPlaceDeltaLayer.__init__(self, base_layer, writes_in_place)

    @property
    def delta_values(self) -> nn.ParameterDict:
        """Trainable values [k] per adapter."""
        return getattr(self, self.adapter_layer_names[0])

    @property
    def delta_indices(self) -> BufferDict:
        """Sorted flat indices [k] into the base weight per adapter."""
        return getattr(self, self.other_param_names[0])

    def update_layer(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        init_weights: bool = True,
        init_seed: int = 0,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with trainable values at the sorted flat ``indices`` [k].

        ``init_weights=True``: the values start at zero (the model is unchanged); False: seeded
        ``N(0, 0.1^2)`` values (a non-zero delta, as peft's other methods offer for tests).
        """
        weight = self.get_base_layer().weight
        check_index_set(indices, self.num_entries, where=f"adapter '{adapter_name}'")
        values_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if init_weights:
            values = torch.zeros(indices.numel(), dtype=values_dtype)
        else:
            generator = torch.Generator().manual_seed(init_seed)
            values = torch.randn(indices.numel(), generator=generator, dtype=values_dtype) * INIT_VALUES_STD
        self.delta_values[adapter_name] = nn.Parameter(values)
        self.delta_indices[adapter_name] = indices.clone()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def num_values(self, adapter_name: str) -> int:
        return self.delta_values[adapter_name].numel()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta of one adapter, shaped like the base weight (fp32 on a quantized base)."""
        weight = self.get_base_layer().weight
        delta = torch.zeros(self.num_entries, dtype=torch.float32, device=weight.device)
        delta[self.delta_indices[adapter_name].long()] = full_tensor(self.delta_values[adapter_name].detach()).float()
        return delta.view(self.weight_shape).to(delta_dtype(self.get_base_layer()))

    @torch.no_grad()
    def effective_weight(self, adapter_name: str) -> torch.Tensor:
        """``W0 + delta`` of one adapter with its current values, as a new fp32 tensor shaped like the weight.

        On a quantized base ``W0`` is dequantized for the call (transient: one matrix at a time).
        """
        weight = dequantized_weight(self.get_base_layer()).clone().view(-1)
        self._take_written_out_of(weight)
        indices = self.delta_indices[adapter_name].long()
        weight[indices] += full_tensor(self.delta_values[adapter_name].detach()).float()
        return weight.view(self.weight_shape)

    # --- what the in-place machinery needs -------------------------------------------------------

    def _held_adapters(self) -> nn.ParameterDict:
        return self.delta_values

    def _source_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return self.delta_values[adapter_name], self.delta_indices[adapter_name]

    def _entries_to_write(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.delta_indices[adapter_name], self.delta_values[adapter_name].detach()

    def _trainable_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (self.delta_values[adapter_name],)

    def _delta_is_finite(self, adapter_name: str) -> bool:
        return bool(torch.isfinite(self.delta_values[adapter_name]).all())

    def _pattern(self, adapter_name: str) -> _CachedPattern:
        indices = self.delta_indices[adapter_name]
        cached = self._patterns.get(adapter_name)
        if cached is None or cached.indices is not indices or cached.indices_version != indices._version:
            # indices change only through in-place copies (selection, load_state_dict), which bump the version
            crow, col = csr_pattern(indices, self.weight_shape)
            cached = _CachedPattern(indices, indices._version, crow, col)
            self._patterns[adapter_name] = cached
        return cached

    def _gradient_binding(self, adapter_name: str) -> SparseDeltaBinding:
        """How backward computes ``d values`` of one adapter held in the weight (here: SDDMM at its pattern)."""
        pattern = self._pattern(adapter_name)
        return SparseDeltaBinding(pattern.crow_indices, pattern.col_indices, self.gradient_observers.get(adapter_name))

    def _delta_term(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x @ S^T`` for one adapter's current values, differentiable in ``x`` and the values."""
        pattern = self._pattern(adapter_name)
        if pattern.output_major is None:
            pattern.output_major = output_major_pattern(
                pattern.indices, self.weight_shape, self.weight_is_transposed
            )
        crow, col, permutation = pattern.output_major
        values = self.delta_values[adapter_name]
        term = sparse_delta_matmul(
            x, values if permutation is None else values[permutation], crow, col, self.out_features
        )
        observer = self.gradient_observers.get(adapter_name)
        if observer is not None and term.requires_grad:
            term.register_hook(partial(observe_weight_gradient, observer, x.detach(), self.weight_is_transposed))
        return term

    # --- peft layer API -----------------------------------------------------------------------

    def delete_adapter(self, adapter_name: str) -> None:
        self._patterns.pop(adapter_name, None)
        self.gradient_observers.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

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
        current_values = full_tensor(values)  # under FSDP: gathered, the same on every rank
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
        new_values = torch.where(source_positions >= 0, current_values[source_positions.clamp(min=0)], 0.0)
        assign_full_(values, new_values)
        indices.copy_(new_indices)
        return source_positions


class SparseDeltaLinear(nn.Module, SparseDeltaLayer):
    """Sparse-delta adapter around an ``nn.Linear`` or transformers ``Conv1D``.

    ``writes_in_place=False`` keeps the delta out of the weight (a tied weight, or the exact mode
    for bf16/fp16 bases: the forward sees ``W0 + delta`` with the delta in fp32).

    Example:
        >>> layer = SparseDeltaLinear(nn.Linear(8, 4), "default", torch.tensor([0, 5, 17], dtype=torch.int32))
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        indices: torch.Tensor,
        writes_in_place: bool = True,
        init_weights: bool = True,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        SparseDeltaLayer.__init__(self, base_layer, writes_in_place)
        self._check_base_layer()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights=init_weights, init_seed=init_seed)

    def _check_base_layer(self) -> None:
        if quantization_of(self.get_base_layer()) is not None:
            raise ValueError(
                f"a bitsandbytes {type(self.get_base_layer()).__name__} cannot hold the delta in place; "
                "use QuantizedSparseDeltaLinear (get_peft_model picks it for quantized layers)"
            )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_with_deltas(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()
