"""The SoRA tuner: injects gated low-rank layers and applies the proximal step to their gates."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...loading import AllOrNothingTuner
from ...sparse.combine import check_same_modules, check_weighted_adapter_arguments, seeded_random
from ...sparse.layer import SUPPORTED_BASE_LAYERS
from .combine import SORA_COMBINATION_TYPES, combine_sora_factors, combined_rank
from .config import SoraConfig
from .layer import SoraLayer, SoraLinear
from .proximal import soft_threshold_


class SoraModel(AllOrNothingTuner):
    """SoRA of a transformers model; build it with ``get_peft_model(model, SoraConfig(...))``.

    Example:
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.SoraConfig(r=8))  # doctest: +SKIP
        >>> model.base_model.live_ranks()  # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj': 8, ...}
    """

    prefix: str = "sora_"
    tuner_layer_cls = SoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _create_and_replace(self, config: SoraConfig, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise ValueError(
                f"target module '{current_key}' is a {type(base).__name__}; SoraConfig supports torch.nn.Linear and "
                "transformers Conv1D. Change target_modules to leave it out."
            )
        layer_kwargs = dict(
            r=config.r, alpha=config.alpha, dropout=config.dropout, gate_init=config.gate_init,
            init_weights=config.init_weights,
        )
        if isinstance(target, SoraLinear):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = SoraLinear(target, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # --- composition ---------------------------------------------------------------------------

    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        density: Optional[float] = None,
        majority_sign_method: str = "total",
        seed: Optional[int] = None,
    ) -> None:
        """Add adapter ``adapter_name`` combining ``adapters`` as peft's LoRA does, each gate folded into its ``B``.

        The result has gate ones and ``alpha = r`` (scale 1); ``"cat"`` (ranks stacked) is exact,
        ``"svd"`` is exact when ``svd_rank`` covers the combined rank, the factor-wise rules
        (``"linear"``, ``"ties"``, ...) approximate (see :mod:`peft_sparse.tuners.sora.combine`).
        ``seed`` seeds dare's random pruning (None: torch's global generator, as peft).
        The sources are left unchanged.

        Example:
            >>> model.add_weighted_adapter(["arith", "caps"], [1.0, 1.0], "both", "cat")  # doctest: +SKIP
        """
        check_weighted_adapter_arguments(
            self.peft_config, adapters, weights, adapter_name, combination_type, SORA_COMBINATION_TYPES, density,
            majority_sign_method,
        )  # fmt: skip
        rank = combined_rank(combination_type, [self.peft_config[a].r for a in adapters], svd_rank)
        layers = [(name, layer) for name, layer in self.model.named_modules()
                  if isinstance(layer, SoraLayer) and set(adapters) & set(layer.sora_gate)]  # fmt: skip
        check_same_modules({a: {name for name, layer in layers if a in layer.sora_gate} for a in adapters})
        self.peft_config[adapter_name] = replace(
            self.peft_config[adapters[0]], r=rank, alpha=float(rank), gate_init="ones", init_weights=True
        )
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            raise
        with seeded_random(seed, layers[0][1].sora_A[adapters[0]].device):
            for _, layer in layers:
                factors = [
                    (layer.sora_A[a].float(), layer.sora_B[a].float() * layer.sora_gate[a].float(), layer.scaling[a])
                    for a in adapters
                ]
                new_a, new_b = combine_sora_factors(
                    combination_type, factors, weights, rank, density, majority_sign_method
                )
                layer.sora_A[adapter_name].copy_(new_a)
                layer.sora_B[adapter_name].copy_(new_b)

    # --- gates ---------------------------------------------------------------------------------

    def sora_layers(self, adapter_name: str = "default") -> Iterator[tuple[str, SoraLayer]]:
        """(module name, layer) of every layer holding adapter ``adapter_name``."""
        for name, module in self.model.named_modules():
            if isinstance(module, SoraLayer) and adapter_name in module.sora_gate:
                yield name, module

    def gates(self, adapter_name: str = "default") -> list[nn.Parameter]:
        """The gate vectors [r] of adapter ``adapter_name``, in module order."""
        return [layer.sora_gate[adapter_name] for _, layer in self.sora_layers(adapter_name)]

    def live_ranks(self, adapter_name: str = "default") -> dict[str, int]:
        """Number of non-zero gates per layer."""
        return {name: layer.live_rank(adapter_name) for name, layer in self.sora_layers(adapter_name)}

    def soft_threshold_gates(self, adapter_name: str, threshold: float) -> None:
        """Apply ``g <- sign(g) * max(|g| - threshold, 0)`` to every gate of the adapter."""
        for gate in self.gates(adapter_name):
            soft_threshold_(gate, threshold)

    @torch.no_grad()
    def add_gate_l1_gradient(self, adapter_name: str, weight: float) -> None:
        """Add the gradient of ``weight * sum|g| / n`` (``n``: number of gate entries) to the gates' gradients."""
        gates = self.gates(adapter_name)
        count = sum(gate.numel() for gate in gates)
        for gate in gates:
            penalty_gradient = gate.sign() * (weight / count)
            gate.grad = penalty_gradient if gate.grad is None else gate.grad.add_(penalty_gradient)
