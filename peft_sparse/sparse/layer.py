"""The shared sparse-delta layer: a frozen dense weight plus trainable ``values`` at flat ``indices``.

One layer, two ways to apply a delta, chosen per forward by what is safe:

* **in place** (the fast path): the delta is written into the frozen weight (``W = W0 + delta``),
  so the forward is a plain linear and ``d values`` is an SDDMM;
* **additive**: the weight is left as it is and the output corrected with sparse terms,
  ``y = x W^T + x (S_wanted - S_written)^T``, as on quantized bases.

A forward writes the weight only when the layer may hold the delta in place (a dense, untied base
and ``delta_in_place=True``) and no autograd graph still holds the weight for backward
(:mod:`.write_guard`). So a forward with the adapter disabled, another adapter active, or a DPO/GRPO
reference pass never modifies a tensor a pending backward needs. Writes touch only the ``k`` indexed
entries; the entries under each written delta are kept, so restoring ``W0`` is bit-exact.

Outside the layer the weight is always ``W0``: ``state_dict()`` reports the pristine base weight (it
restores it in place when that is safe, else hands out a restored copy), and ``load_state_dict``
takes written deltas out before loading.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_kernels import scatter_assign, sparse_delta_matmul

from ..quantization import delta_dtype, dequantized_weight, quantization_of, weight_matrix_shape
from .distributed import assign_full_, full_tensor, is_sharding_managed
from .gradient import GradientObserver, MergedSparseDeltaLinear, SparseDeltaBinding, observe_weight_gradient
from .indices import check_index_set, csr_pattern, output_major_pattern
from .write_guard import GraphHolds, on_optimizer_step, optimizer_steps

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)
# init_weights=False: values start at N(0, INIT_VALUES_STD^2), seeded per layer (for tests, as peft's methods do)
INIT_VALUES_STD = 0.1


@dataclass
class _Source:
    """What a written delta was made from; the delta is stale once any of it changed."""

    values: torch.Tensor
    values_version: int
    indices: torch.Tensor
    indices_version: int
    optimizer_steps: int

    def matches(self, values: torch.Tensor, indices: torch.Tensor) -> bool:
        return (
            self.values is values
            and self.indices is indices
            and self.values_version == values._version
            and self.indices_version == indices._version
            and self.optimizer_steps == optimizer_steps()
        )


@dataclass
class _WrittenDelta:
    """A delta currently written into the base weight, with what is needed to take it out exactly."""

    indices: torch.Tensor  # copy of the indices written to (the live buffer may change underneath)
    base_values: torch.Tensor  # weight entries at `indices` before the write
    undo: torch.Tensor  # fp32 [k]: base_values - written entries; adding this term takes the delta out
    source: _Source
    undo_pattern: Optional[tuple] = None  # output-major CSR of `indices`, made on first additive use


@dataclass
class _CachedPattern:
    indices: torch.Tensor
    indices_version: int
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    output_major: Optional[tuple] = None  # (crow, col, permutation) for the additive path


class SparseDeltaLayer(BaseTunerLayer):
    """Adapter state for a sparse delta on one weight matrix, keyed by adapter name."""

    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices",)

    def __init__(self, base_layer: nn.Module, writes_in_place: bool = True) -> None:
        self.base_layer = base_layer
        # attribute names come from the class, so each method has its own state-dict prefix
        setattr(self, self.adapter_layer_names[0], nn.ParameterDict({}))
        setattr(self, self.other_param_names[0], BufferDict({}, persistent=True))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._written: dict[str, _WrittenDelta] = {}
        self._patterns: dict[str, _CachedPattern] = {}
        self._exported_weights: list[weakref.ref] = []
        self.gradient_observers: dict[str, GradientObserver] = {}
        self.weight_holds = GraphHolds()

        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(
                f"sparse-delta layers support torch.nn.Linear and transformers Conv1D, got {type(base).__name__}"
            )
        self.weight_is_transposed = isinstance(base, Conv1D)
        if not base.weight.is_contiguous():
            raise ValueError(f"sparse-delta layers need a contiguous base weight, got strides {base.weight.stride()}")
        rows, cols = weight_matrix_shape(base)
        self.in_features, self.out_features = (rows, cols) if self.weight_is_transposed else (cols, rows)
        # a tied or quantized weight never holds the delta; it is applied as a sparse term instead
        self.writes_in_place = writes_in_place and quantization_of(base) is None
        self.weight_is_tied = False
        self.register_state_dict_post_hook(_report_pristine_base_weight)
        self.register_load_state_dict_pre_hook(_take_written_deltas_out)

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
    def pristine_weight(self) -> torch.Tensor:
        """``W0`` as a new tensor shaped and typed like the stored weight (written deltas taken out)."""
        weight = self.get_base_layer().weight.detach().clone()
        self._take_written_out_of(weight.view(-1))
        return weight

    def _take_written_out_of(self, flat_weight: torch.Tensor) -> None:
        """Put ``W0`` back at every written entry of ``flat_weight``, a flat copy of the weight."""
        for written in reversed(self._written.values()):  # last-in first-out, as in _sync_written
            flat_weight[written.indices.long()] = written.base_values.to(flat_weight)

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

    # --- what is written into the weight ------------------------------------------------------

    def weight_is_sharded(self) -> bool:
        """Whether FSDP or DeepSpeed ZeRO-3 shards the base weight: gathered anew for every forward, it cannot hold a delta."""
        return is_sharding_managed(self.get_base_layer())

    def may_write(self) -> bool:
        """Whether a forward may change what the weight holds: in-place layer, unsharded, no graph holds the weight."""
        return self.writes_in_place and self.weight_holds.count == 0 and not self.weight_is_sharded()

    def _is_fresh(self, adapter_name: str) -> bool:
        # host-side counters only: no GPU synchronisation per forward (see write_guard)
        return self._written[adapter_name].source.matches(
            self.delta_values[adapter_name], self.delta_indices[adapter_name]
        )

    @torch.no_grad()
    def _write(self, adapter_name: str) -> None:
        _LAYERS_WITH_WRITTEN_DELTAS.add(self)
        self._detach_exported_weights()
        weight = self.get_base_layer().weight
        values, indices = self.delta_values[adapter_name], self.delta_indices[adapter_name]
        positions = indices.long()
        base_values = weight.view(-1)[positions]
        scatter_assign(weight, indices, base_values, values)
        undo = base_values.float() - weight.view(-1)[positions].float()
        source = _Source(values, values._version, indices, indices._version, optimizer_steps())
        self._written[adapter_name] = _WrittenDelta(indices.clone(), base_values, undo, source)

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

    def _detach_exported_weights(self) -> None:
        """Give the weight new storage if a state dict still holds the ``W0`` it was handed (it must stay ``W0``)."""
        if any(reference() is not None for reference in self._exported_weights):
            weight = self.get_base_layer().weight
            weight.data = weight.data.clone()
        self._exported_weights.clear()

    def _export_pristine_weight(self) -> torch.Tensor:
        """``W0`` for a state dict: the weight itself after taking the deltas out, if that is safe, else a copy."""
        if self._written and not self.may_write():
            return self.pristine_weight()
        self._sync_written([])  # k writes; the next forward writes the deltas back
        exported = self.get_base_layer().weight.detach()
        self._exported_weights.append(weakref.ref(exported))
        return exported

    def base_weight_key(self) -> str:
        """State-dict key of the base weight relative to this layer (``base_layer.weight``, nested if wrapped)."""
        key, module = "base_layer", self.base_layer
        while hasattr(module, "base_layer"):
            key, module = f"{key}.base_layer", module.base_layer
        return f"{key}.weight"

    def _pattern(self, adapter_name: str) -> _CachedPattern:
        indices = self.delta_indices[adapter_name]
        cached = self._patterns.get(adapter_name)
        if cached is None or cached.indices is not indices or cached.indices_version != indices._version:
            # indices change only through in-place copies (selection, load_state_dict), which bump the version
            crow, col = csr_pattern(indices, self.weight_shape)
            cached = _CachedPattern(indices, indices._version, crow, col)
            self._patterns[adapter_name] = cached
        return cached

    # --- forward ------------------------------------------------------------------------------

    def _wanted_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        if self.merged:
            return list(self.merged_adapters)
        return [name for name in self.active_adapters if name in self.delta_values]

    def _base_output(self, x: torch.Tensor, in_weight: list[str], *args, **kwargs) -> torch.Tensor:
        """``x W^T + b`` with the weight as it is; ``d values`` by SDDMM for the trainable adapters it holds."""
        if not torch.is_grad_enabled():
            return self.base_layer(x, *args, **kwargs)
        trainable = [name for name in in_weight if self.delta_values[name].requires_grad]
        bindings = [self._gradient_binding(name) for name in trainable]
        base = self.get_base_layer()
        return MergedSparseDeltaLinear.apply(
            x, base.weight, base.bias, self.weight_is_transposed, self.weight_holds, bindings,
            *(self.delta_values[name] for name in trainable),
        )

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

    def _undo_term(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x @ U^T`` with U the written delta of one adapter negated, from the entries actually written."""
        written = self._written[adapter_name]
        if written.undo_pattern is None or written.undo_pattern[0].device != x.device:
            written.undo_pattern = output_major_pattern(
                written.indices.to(x.device), self.weight_shape, self.weight_is_transposed
            )
        crow, col, permutation = written.undo_pattern
        undo = written.undo.to(x.device)
        return sparse_delta_matmul(
            x, undo if permutation is None else undo[permutation], crow, col, self.out_features
        )

    # Runs eagerly under torch.compile (one graph break per layer): which deltas the weight holds is
    # host-side state that changes between forwards, so a traced forward would guard on it and
    # recompile on every change (measured on the tiny Llama: the recompile limit was hit, and the
    # first compiled step took 180 s), and its CSR gradient is a sparse tensor Dynamo cannot trace.
    @torch.compiler.disable
    def forward_with_deltas(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base output with exactly the wanted deltas, in place where safe, else additively."""
        wanted = self._wanted_adapters()
        if self.may_write():
            self._sync_written(wanted)
        elif self._written and self.weight_is_sharded():
            raise ValueError(
                "this layer's weight was sharded (FSDP / DeepSpeed ZeRO-3) while it held a written delta, so the "
                "shards hold it too: shard the model before its first forward, or unmerge first"
            )
        fresh = {name for name in self._written if self._is_fresh(name)}
        in_weight = [name for name in wanted if name in fresh]
        result = self._base_output(x, in_weight, *args, **kwargs)
        for name in reversed(self._written):
            if name not in in_weight:
                result = result + self._undo_term(x, name).to(result.dtype)
        for name in wanted:
            if name not in in_weight:
                result = result + self._delta_term(x, name).to(result.dtype)
        return result

    # --- peft layer API -----------------------------------------------------------------------

    def merge_refusal(self, adapter_names: list[str]) -> Optional[str]:
        """Why ``adapter_names`` cannot be merged into this layer, or None."""
        if adapter_names and self.weight_is_tied:
            return (
                f"cannot merge adapter(s) {adapter_names}: this layer's weight is tied to another module (e.g. the "
                "input embeddings), which would change too. Load the base model with tie_word_embeddings=False "
                "(or untie the weights) before adding the adapter, or use the adapter unmerged"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into the base weight (``safe_merge`` checks the values for NaN/Inf first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.delta_values]
        refusal = self.merge_refusal(adapter_names)
        if refusal is not None:
            raise ValueError(refusal)
        if safe_merge:
            for name in adapter_names:
                if not torch.isfinite(self.delta_values[name]).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self.merged_adapters.extend(adapter_names)
        if self.merged_adapters:  # an explicit request: writes even while a graph holds the weight, as peft's merge
            self._sync_written(self.merged_adapters)

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
        self._sync_written(self.merged_adapters if merge else [])  # also for a layer that holds none of them
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


# layers whose weight may hold a written delta; after an optimizer step their deltas are stale anyway
_LAYERS_WITH_WRITTEN_DELTAS: "weakref.WeakSet[SparseDeltaLayer]" = weakref.WeakSet()


def _take_out_stale_deltas() -> None:
    """After an optimizer step: restore ``W0`` in every layer that may write (the next forward writes afresh).

    The written deltas are stale after a step, so this costs nothing extra (the rewrite would take
    them out anyway), and between a step and the next forward (checkpoints, evaluation hooks,
    ``named_parameters()``) the frozen weights are exactly ``W0``. Merged adapters stay written.
    """
    for layer in list(_LAYERS_WITH_WRITTEN_DELTAS):
        if layer.may_write():
            layer._sync_written([name for name in layer.merged_adapters if name in layer._written])


on_optimizer_step(_take_out_stale_deltas)


def _report_pristine_base_weight(module: SparseDeltaLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the base weight is reported as ``W0``, never with a written delta."""
    key = prefix + module.base_weight_key()
    # a layer that never writes its weight (quantized, tied, sharded, exact mode) leaves the entry as it is
    if key in state_dict and (module.writes_in_place or module._written) and not module.weight_is_sharded():
        state_dict[key] = module._export_pristine_weight()


def _take_written_deltas_out(module: SparseDeltaLayer, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a loaded base weight is ``W0``, and loaded values are written afresh."""
    module._sync_written([])


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
