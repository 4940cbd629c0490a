"""A delta held in the frozen weight, invisible outside its layer: the machinery SFT, LIFT, S2FT, RoSA and SNELL share.

One layer, two ways to apply a delta, chosen per forward by what is safe:

* **in place** (the fast path): the delta's non-zero entries are written into the frozen weight
  (``W = W0 + delta``), so the forward is a plain linear and backward hands the factors of the
  weight gradient to each adapter's *gradient binding* (SDDMM for an index set, a GEMM for a slice,
  the kernel chain rule for SNELL);
* **additive**: the weight is left as it is and the output corrected with separate terms,
  ``y = x W^T + x (delta_wanted - delta_written)^T``, as on quantized, tied or sharded bases.

A forward writes the weight only when the layer may hold the delta in place (a dense, untied,
unsharded base and ``writes_in_place``) and no autograd graph still holds the weight for backward
(:mod:`.write_guard`). So a forward with the adapter disabled, another adapter active, or a DPO/GRPO
reference pass never modifies a tensor a pending backward needs. Writes touch only the written
entries, and the entries under each written delta are kept, so restoring ``W0`` is bit-exact.

Outside the layer the weight is always ``W0``: ``state_dict()`` reports the pristine base weight (it
restores it in place when that is safe, else hands out a restored copy), ``load_state_dict`` takes
written deltas out before loading, and after every optimizer step the stale deltas are taken out.

A subclass says what its adapters are (:meth:`InPlaceDeltaLayer._held_adapters`), which tensors a
delta is made from (:meth:`~InPlaceDeltaLayer._source_tensors`), the entries to write
(:meth:`~InPlaceDeltaLayer._entries_to_write`), its trainable tensors and their gradient binding,
and the additive term.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Container
from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from triton_kernels import scatter_assign, sparse_delta_matmul

from ..quantization import merge_refusal, quantization_of, weight_matrix_shape
from .distributed import is_sharding_managed
from .gradient import GradientBinding, MergedSparseDeltaLinear
from .indices import output_major_pattern
from .write_guard import GraphHolds, on_optimizer_step, optimizer_steps

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


@dataclass
class _Source:
    """What a written delta was made from; the delta is stale once any of it changed."""

    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    optimizer_steps: int

    @classmethod
    def of(cls, tensors: tuple[torch.Tensor, ...]) -> _Source:
        return cls(tensors, tuple(tensor._version for tensor in tensors), optimizer_steps())

    def matches(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        # host-side counters only: no GPU synchronisation per forward (see write_guard)
        return (
            len(tensors) == len(self.tensors)
            and all(mine is theirs for mine, theirs in zip(self.tensors, tensors))
            and all(version == tensor._version for version, tensor in zip(self.versions, tensors))
            and self.optimizer_steps == optimizer_steps()
        )


@dataclass
class _WrittenDelta:
    """A delta currently written into the base weight, with what is needed to take it out exactly."""

    indices: torch.Tensor  # flat positions written to (a copy: the live index buffer may change underneath)
    base_values: torch.Tensor  # weight entries at `indices` before the write
    undo: torch.Tensor  # fp32 [k]: base_values - written entries; adding this term takes the delta out
    source: _Source
    undo_pattern: Optional[tuple] = None  # output-major CSR of `indices`, made on first additive use


class InPlaceDeltaLayer(BaseTunerLayer):
    """A ``BaseTunerLayer`` whose adapters' deltas may be held in the frozen base weight (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, writes_in_place: bool = True) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._written: dict[str, _WrittenDelta] = {}
        self._exported_weights: list[weakref.ref] = []
        self.weight_holds = GraphHolds()

        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(f"{type(self).__name__} supports torch.nn.Linear and transformers Conv1D, got {type(base).__name__}")
        self.weight_is_transposed = isinstance(base, Conv1D)
        if not base.weight.is_contiguous():
            raise ValueError(f"{type(self).__name__} needs a contiguous base weight, got strides {base.weight.stride()}")
        rows, cols = weight_matrix_shape(base)
        self.in_features, self.out_features = (rows, cols) if self.weight_is_transposed else (cols, rows)
        # a tied or quantized weight never holds the delta; it is applied as a separate term instead
        self.writes_in_place = writes_in_place and quantization_of(base) is None
        self.weight_is_tied = False
        self.register_state_dict_post_hook(_report_pristine_base_weight)
        self.register_load_state_dict_pre_hook(_take_written_deltas_out)

    # --- what a subclass provides -------------------------------------------------------------

    def _held_adapters(self) -> Container[str]:
        """The adapters this layer holds."""
        raise NotImplementedError

    def _source_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The tensors one adapter's delta is made from; a written delta is stale once one of them changed."""
        raise NotImplementedError

    def _entries_to_write(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat indices [k], values [k])`` of one adapter's delta in the stored weight, without grad."""
        raise NotImplementedError

    def _trainable_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The parameters whose gradient ``_gradient_binding(adapter_name)`` computes, in its order."""
        raise NotImplementedError

    def _gradient_binding(self, adapter_name: str) -> GradientBinding:
        """How backward computes the trainable tensors' gradients of one adapter held in the weight."""
        raise NotImplementedError

    def _delta_term(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x @ delta^T`` for one adapter's current delta, differentiable in ``x`` and its parameters."""
        raise NotImplementedError

    def _delta_is_finite(self, adapter_name: str) -> bool:
        """Whether the delta of ``adapter_name`` has no NaN/Inf (``safe_merge``)."""
        raise NotImplementedError

    # --- the stored weight --------------------------------------------------------------------

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored ([out, in] for Linear and bitsandbytes layers, [in, out] for Conv1D)."""
        return weight_matrix_shape(self.get_base_layer())

    @property
    def num_entries(self) -> int:
        rows, cols = self.weight_shape
        return rows * cols

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

    def base_weight_key(self) -> str:
        """State-dict key of the base weight relative to this layer (``base_layer.weight``, nested if wrapped)."""
        key, module = "base_layer", self.base_layer
        while hasattr(module, "base_layer"):
            key, module = f"{key}.base_layer", module.base_layer
        return f"{key}.weight"

    # --- what is written into the weight ------------------------------------------------------

    def weight_is_sharded(self) -> bool:
        """Whether FSDP or DeepSpeed ZeRO-3 shards the base weight: gathered anew for every forward, it cannot hold a delta."""
        return is_sharding_managed(self.get_base_layer())

    def may_write(self) -> bool:
        """Whether a forward may change what the weight holds: in-place layer, unsharded, no graph holds the weight."""
        return self.writes_in_place and self.weight_holds.count == 0 and not self.weight_is_sharded()

    def _is_fresh(self, adapter_name: str) -> bool:
        return self._written[adapter_name].source.matches(self._source_tensors(adapter_name))

    @torch.no_grad()
    def _write(self, adapter_name: str) -> None:
        _LAYERS_WITH_WRITTEN_DELTAS.add(self)
        self._detach_exported_weights()
        weight = self.get_base_layer().weight
        source = _Source.of(self._source_tensors(adapter_name))
        indices, values = self._entries_to_write(adapter_name)
        positions = indices.long()
        base_values = weight.view(-1)[positions]
        scatter_assign(weight, indices, base_values, values)
        undo = base_values.float() - weight.view(-1)[positions].float()
        self._written[adapter_name] = _WrittenDelta(indices.clone(), base_values, undo, source)

    @torch.no_grad()
    def _restore(self, adapter_name: str) -> None:
        written = self._written.pop(adapter_name)
        weight = self.get_base_layer().weight
        indices = written.indices.to(weight.device).long()
        weight.view(-1).index_copy_(0, indices, written.base_values.to(weight.device))

    def _sync_written(self, wanted: list[str]) -> None:
        """Make the base weight hold exactly ``W0 + sum(delta[a] for a in wanted)`` with current parameters."""
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

    # --- forward ------------------------------------------------------------------------------

    def _wanted_adapters(self) -> list[str]:
        if self.disable_adapters:
            return []
        if self.merged:
            return list(self.merged_adapters)
        held = self._held_adapters()
        return [name for name in self.active_adapters if name in held]

    def _base_output(self, x: torch.Tensor, in_weight: list[str], *args, **kwargs) -> torch.Tensor:
        """``x W^T + b`` with the weight as it is; gradients by binding for the trainable adapters it holds."""
        if not torch.is_grad_enabled() or quantization_of(self.get_base_layer()) is not None:
            return self.base_layer(x, *args, **kwargs)  # a quantized weight: bitsandbytes' own autograd
        trainable = {name: self._trainable_tensors(name) for name in in_weight}
        trainable = {name: tensors for name, tensors in trainable.items() if any(t.requires_grad for t in tensors)}
        bindings = [self._gradient_binding(name) for name in trainable]
        tensors = [tensor for name_tensors in trainable.values() for tensor in name_tensors]
        base = self.get_base_layer()
        return MergedSparseDeltaLinear.apply(
            x, base.weight, base.bias, self.weight_is_transposed, self.weight_holds, bindings, *tensors
        )

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
        """Why ``adapter_names`` cannot be merged into this layer (a quantized or tied weight), or None."""
        refusal = merge_refusal(self.get_base_layer(), adapter_names)
        if refusal is not None:
            return refusal
        if adapter_names and self.weight_is_tied:
            return (
                f"cannot merge adapter(s) {adapter_names}: this layer's weight is tied to another module (e.g. the "
                "input embeddings), which would change too. Load the base model with tie_word_embeddings=False "
                "(or untie the weights) before adding the adapter, or use the adapter unmerged"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into the base weight (``safe_merge`` checks each delta for NaN/Inf first)."""
        held = self._held_adapters()
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in held]
        refusal = self.merge_refusal(adapter_names)
        if refusal is not None:
            raise ValueError(refusal)
        if safe_merge:
            for name in adapter_names:
                if not self._delta_is_finite(name):
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
        if adapter_name in self.merged_adapters:
            self.merged_adapters.remove(adapter_name)
        super().delete_adapter(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


def weight_is_tied(model: nn.Module, weight: nn.Parameter) -> bool:
    """Whether ``weight`` is shared with another module of ``model`` (e.g. an output head tied to the input embeddings)."""
    return sum(parameter is weight for _, parameter in model.named_parameters(remove_duplicate=False)) > 1


def mark_tied_weight(layer: InPlaceDeltaLayer, model: nn.Module, delta_in_place: bool) -> None:
    """Keep a layer's delta out of its weight if the config asks so or the weight is tied (see ``weight_is_tied``)."""
    layer.weight_is_tied = weight_is_tied(model, layer.get_base_layer().weight)
    layer.writes_in_place = layer.writes_in_place and delta_in_place and not layer.weight_is_tied


# layers whose weight may hold a written delta; after an optimizer step their deltas are stale anyway
_LAYERS_WITH_WRITTEN_DELTAS: "weakref.WeakSet[InPlaceDeltaLayer]" = weakref.WeakSet()


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


def _report_pristine_base_weight(module: InPlaceDeltaLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the base weight is reported as ``W0``, never with a written delta."""
    key = prefix + module.base_weight_key()
    # a layer that never writes its weight (quantized, tied, sharded, exact mode) leaves the entry as it is
    if key in state_dict and (module.writes_in_place or module._written) and not module.weight_is_sharded():
        state_dict[key] = module._export_pristine_weight()


def _take_written_deltas_out(module: InPlaceDeltaLayer, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a loaded base weight is ``W0``, and loaded parameters are written afresh."""
    module._sync_written([])
