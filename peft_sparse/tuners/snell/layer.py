"""The SNELL adapter layer: ``y = base(x) + dropout(x) @ E^T``, ``E`` a thresholded kernel of two factors.

No mask or indices are stored. Two paths, chosen per forward by the shared in-place machinery
(:mod:`peft_sparse.sparse.in_place`, with its guarantees: ``W0`` in state dicts, disabled and
reference forwards, tied and sharded weights):

* **in place** (dense, untied, unsharded base, no dropout): once per optimizer step the threshold of
  ``|K|`` is found (``threshold.py``) and ``E``'s non-zero entries are written into the frozen
  weight, so the forward is the base linear alone. Backward gets ``dL/dE = dy^T x`` by row chunks
  (a fused Triton kernel on CUDA), masks it and pushes it through the kernel into the factors
  (:func:`triton_kernels.snell_matmul.snell_factor_grads`): full fine-tuning's gradient GEMM plus
  the kernel's O(out x in x r) chain rule.
* **additive** (quantized, tied, sharded, held by a pending graph, dropout, ``delta_in_place=False``):
  ``E`` applied by :func:`triton_kernels.snell_delta_matmul` in every forward, which keeps neither
  ``K`` nor ``E`` for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from triton_kernels.snell_matmul import (
    KernelSpec,
    kept_entries,
    kernel_matrix,
    snell_delta_matmul,
    snell_factor_grads,
    sparse_delta,
)

from ...quantization import delta_dtype, keep_trainable_layout
from ...sparse.gradient import GradientObserver
from ...sparse.in_place import InPlaceDeltaLayer
from ...sparse.indices import index_dtype_for
from .config import SnellConfig
from .threshold import keep_threshold


def kept_count(num_entries: int, sparsity: float) -> int:
    """Entries a matrix with ``num_entries`` entries keeps at ``sparsity`` (fraction zeroed)."""
    return num_entries - round(sparsity * num_entries)


@dataclass
class SnellGradientBinding:
    """Backward of a weight holding ``E``: ``(dL/dA, dL/dB)`` from the factors of ``dL/dW`` (see the module docstring)."""

    input_factors: torch.Tensor
    output_factors: torch.Tensor
    threshold: torch.Tensor  # the one the written entries were chosen with
    spec: KernelSpec
    weight_is_transposed: bool
    observer: Optional[GradientObserver] = None

    def gradient(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # stored weight gradient = left @ right: dy^T x for Linear, x^T dy for Conv1D
        x, grad_output = (left.t(), right) if self.weight_is_transposed else (right, left.t())
        return snell_factor_grads(
            x, grad_output, self.input_factors.detach(), self.output_factors.detach(), self.threshold, self.spec
        )


class SnellLayer(InPlaceDeltaLayer):
    """Adapter state of SNELL on one weight matrix, keyed by adapter name.

    ``snell_input_factors[name]`` [H, in, r / H] and ``snell_output_factors[name]`` [H, out, r / H]
    are trained; ``snell_num_kept[name]`` (saved with the adapter) is how many entries of ``E`` are
    non-zero, which SNELLA changes during training.
    """

    adapter_layer_names = ("snell_input_factors", "snell_output_factors")
    other_param_names = ("snell_num_kept", "snell_dropout", "kernel_spec", "threshold_sample_size")

    def __init__(self, base_layer: nn.Module, sample_seed: int = 0, writes_in_place: bool = True) -> None:
        self.snell_input_factors = nn.ParameterDict({})
        self.snell_output_factors = nn.ParameterDict({})
        self.snell_num_kept = BufferDict({}, persistent=True)
        self.snell_dropout = nn.ModuleDict({})
        self.kernel_spec: dict[str, KernelSpec] = {}
        self.threshold_sample_size: dict[str, Optional[int]] = {}
        self.sample_seed = sample_seed
        self._num_kept_cache: dict[str, tuple[torch.Tensor, int, int]] = {}
        self._write_thresholds: dict[str, torch.Tensor] = {}
        InPlaceDeltaLayer.__init__(self, base_layer, writes_in_place)
        keep_trainable_layout(self.get_base_layer())

    @property
    def num_entries(self) -> int:
        return self.out_features * self.in_features

    def update_layer(self, adapter_name: str, config: SnellConfig, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name``: factors initialised as ``config.init_weights`` says."""
        groups, width = config.kernel_groups, config.r // config.kernel_groups
        input_factors = torch.empty(groups, self.in_features, width)
        output_factors = torch.empty(groups, self.out_features, width)
        # uniform(+-1/sqrt(fan_in)), fan_in = rows * width: the paper's kaiming_uniform(a=sqrt(5)) on [H, rows, width]
        for factors in (input_factors, output_factors):
            bound = 1 / math.sqrt(factors.shape[1] * width)
            nn.init.uniform_(factors, -bound, bound)
        if config.init_weights and config.kernel == "linear":
            output_factors.zero_()
        elif config.init_weights:
            # odd groups copy even ones: c_h alternates in sign, so each pair cancels exactly
            input_factors[1::2] = input_factors[0::2]
            output_factors[1::2] = output_factors[0::2]
        self.snell_input_factors[adapter_name] = nn.Parameter(input_factors)
        self.snell_output_factors[adapter_name] = nn.Parameter(output_factors)
        self.snell_num_kept[adapter_name] = torch.tensor(kept_count(self.num_entries, config.sparsity))
        self.snell_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.kernel_spec[adapter_name] = KernelSpec(
            config.kernel, config.kernel_scale, config.rbf_gamma, config.magnitude_competition
        )
        self.threshold_sample_size[adapter_name] = config.threshold_sample_size
        # a dropped-out input reaches the delta only, which a weight holding it cannot do
        self.writes_in_place = self.writes_in_place and config.delta_in_place and config.dropout == 0
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # --- the delta ----------------------------------------------------------------------------

    def num_kept(self, adapter_name: str) -> int:
        """Non-zero entries of the delta, read from the saved buffer only when it changed (no GPU sync)."""
        buffer = self.snell_num_kept[adapter_name]
        cached = self._num_kept_cache.get(adapter_name)
        if cached is None or cached[0] is not buffer or cached[1] != buffer._version:
            # fill_ (SNELLA) and load_state_dict's copy_ bump the version
            cached = (buffer, buffer._version, int(buffer))
            self._num_kept_cache[adapter_name] = cached
        return cached[2]

    def sparsity(self, adapter_name: str) -> float:
        return 1 - self.num_kept(adapter_name) / self.num_entries

    def set_num_kept(self, adapter_name: str, num_kept: int) -> None:
        """Keep ``num_kept`` entries of this layer's delta from now on (SNELLA's per-layer budget)."""
        if not 0 <= num_kept <= self.num_entries:
            raise ValueError(f"num_kept must be in [0, {self.num_entries}], got {num_kept}")
        self.snell_num_kept[adapter_name].fill_(num_kept)

    # Runs eagerly under torch.compile: the kept count is a host-side int that SNELLA changes during
    # training, which a traced threshold would specialise on and recompile for.
    @torch.compiler.disable
    def threshold(self, adapter_name: str) -> torch.Tensor:
        """The current ``tau`` of one adapter (0-dim; no gradient)."""
        return keep_threshold(
            self.snell_input_factors[adapter_name].detach(),
            self.snell_output_factors[adapter_name].detach(),
            self.kernel_spec[adapter_name],
            self.num_kept(adapter_name),
            self.threshold_sample_size[adapter_name],
            self.sample_seed,
        )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense sparse delta ``E`` of one adapter, shaped and typed like the base weight."""
        input_factors, output_factors = self.snell_input_factors[adapter_name], self.snell_output_factors[adapter_name]
        spec = self.kernel_spec[adapter_name]
        kernel = kernel_matrix(input_factors, output_factors, spec)
        delta = sparse_delta(kernel, self.threshold(adapter_name), spec.magnitude)
        return (delta.T if self.weight_is_transposed else delta).to(delta_dtype(self.get_base_layer()))

    # --- what the in-place machinery needs -------------------------------------------------------

    def _held_adapters(self) -> nn.ParameterDict:
        return self.snell_input_factors

    def _source_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (
            self.snell_input_factors[adapter_name],
            self.snell_output_factors[adapter_name],
            self.snell_num_kept[adapter_name],
        )

    def _entries_to_write(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        threshold = self.threshold(adapter_name)
        self._write_thresholds[adapter_name] = threshold
        return kept_entries(
            self.snell_input_factors[adapter_name].detach(),
            self.snell_output_factors[adapter_name].detach(),
            threshold,
            self.kernel_spec[adapter_name],
            transposed=self.weight_is_transposed,
            index_dtype=index_dtype_for(self.num_entries),
        )

    def _trainable_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return self.snell_input_factors[adapter_name], self.snell_output_factors[adapter_name]

    def _gradient_binding(self, adapter_name: str) -> SnellGradientBinding:
        return SnellGradientBinding(
            self.snell_input_factors[adapter_name],
            self.snell_output_factors[adapter_name],
            self._write_thresholds[adapter_name],
            self.kernel_spec[adapter_name],
            self.weight_is_transposed,
        )

    def _delta_term(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``dropout(x) @ E^T`` without materialising ``E`` (see the module docstring)."""
        return snell_delta_matmul(
            self.snell_dropout[adapter_name](x),
            self.snell_input_factors[adapter_name],
            self.snell_output_factors[adapter_name],
            self.threshold(adapter_name),
            self.kernel_spec[adapter_name],
        )

    def _delta_is_finite(self, adapter_name: str) -> bool:
        return all(bool(torch.isfinite(tensor).all()) for tensor in self._trainable_tensors(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._write_thresholds.pop(adapter_name, None)
        self._num_kept_cache.pop(adapter_name, None)


class SnellLinear(nn.Module, SnellLayer):
    """SNELL adapter around an ``nn.Linear`` or transformers ``Conv1D``.

    Example:
        >>> layer = SnellLinear(nn.Linear(8, 4), "default", SnellConfig(r=4, sparsity=0.5))
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SnellConfig, sample_seed: int = 0) -> None:
        super().__init__()
        SnellLayer.__init__(self, base_layer, sample_seed, writes_in_place=config.delta_in_place)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_with_deltas(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "snell." + super().__repr__()
