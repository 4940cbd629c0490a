"""The SoRA layer: a frozen linear layer plus a gated low-rank delta ``s * B diag(g) A``."""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...additive_delta import AdditiveDeltaLayer
from ...quantization import delta_dtype, keep_trainable_layout, weight_matrix_shape
from ...sparse.layer import SUPPORTED_BASE_LAYERS


class SoraLayer(AdditiveDeltaLayer, BaseTunerLayer):
    """Adapter state of one target layer, keyed by adapter name.

    Per adapter: ``sora_A`` [r, in] (Kaiming uniform), ``sora_B`` [out, r] (zeros),
    ``sora_gate`` [r] (ones, or standard normal for parity with the reference), and the
    scale ``alpha / r``. A rank whose gate is exactly zero contributes nothing and is
    dropped by ``export_sora_to_lora``.
    """

    adapter_layer_names = ("sora_A", "sora_B", "sora_gate")
    other_param_names = ("r", "alpha", "scaling", "sora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.sora_A = nn.ParameterDict({})
        self.sora_B = nn.ParameterDict({})
        self.sora_gate = nn.ParameterDict({})
        self.sora_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(f"SoRA layers support torch.nn.Linear and transformers Conv1D, got {type(base).__name__}")
        self.weight_is_transposed = isinstance(base, Conv1D)  # Conv1D stores its weight as [in, out]
        keep_trainable_layout(base)
        rows, cols = weight_matrix_shape(base)  # bitsandbytes layers store their weight packed
        out_features, in_features = (cols, rows) if self.weight_is_transposed else (rows, cols)
        self.in_features, self.out_features = in_features, out_features

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float,
        gate_init: str,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` of rank ``r``; a zero delta (``B = 0``), or random ``B`` if not ``init_weights``."""
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.sora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight_a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5))  # as peft's LoRA A
        self.sora_A[adapter_name] = nn.Parameter(weight_a)
        weight_b = torch.zeros(self.out_features, r)
        if not init_weights:  # as peft's LoRA with init_lora_weights=False: B initialised like A
            nn.init.kaiming_uniform_(weight_b, a=math.sqrt(5))
        self.sora_B[adapter_name] = nn.Parameter(weight_b)
        self.sora_gate[adapter_name] = nn.Parameter(torch.ones(r) if gate_init == "ones" else torch.randn(r))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def live_rank(self, adapter_name: str) -> int:
        """Number of ranks whose gate is not exactly zero."""
        return int(torch.count_nonzero(self.sora_gate[adapter_name]))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B diag(g) A`` shaped like the base weight ([out, in], or [in, out] for Conv1D)."""
        gated_b = self.sora_B[adapter_name] * self.sora_gate[adapter_name]  # [out, r]
        delta = (gated_b @ self.sora_A[adapter_name]) * self.scaling[adapter_name]  # [out, in]
        return (delta.T if self.weight_is_transposed else delta).to(delta_dtype(self.get_base_layer()))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class SoraLinear(nn.Module, SoraLayer):
    """SoRA around an ``nn.Linear`` or transformers ``Conv1D``: ``y = base(x) + s * B (g * (A x))``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__()
        SoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_with_adapters(x, *args, **kwargs)

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s * B (g * (A dropout(x)))``, computed in the adapter's dtype."""
        weight_a = self.sora_A[adapter_name]
        hidden = F.linear(self.sora_dropout[adapter_name](self._cast_input_dtype(x, weight_a.dtype)), weight_a)
        hidden = hidden * self.sora_gate[adapter_name]  # [..., r]
        return F.linear(hidden, self.sora_B[adapter_name]) * self.scaling[adapter_name]

    def __repr__(self) -> str:
        return "sora." + super().__repr__()
